"""Exponential moving average of the weights (``ema_decay`` / ``--ema-decay``, timm's ``--model-ema``).

After every optimizer step each trainable parameter's average moves towards it:
``average += (1 - d) * (param - average)`` with ``d = min(ema_decay, (1 + step) / (10 + step))``, ``step``
counting the updates from 0 (the warmup of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``):
early on the average follows the weights (it never keeps the head's random start), and on a run too
short to reach ``ema_decay`` it averages about the last tenth of training whatever the decay.

- The average is float32 whatever the autocast, one copy of every parameter, held as the parameter is:
  a DTensor slice under FSDP2 (each rank averages its own slice), a plain tensor otherwise. It is never
  wrapped by DDP: every rank applies the same update to the same synced parameters, so the averages
  are bit-identical across ranks (the trainer's rank check covers them).
- Frozen parameters are not updated: they do not change, so their average is their value. A layer that
  joins at an unfreeze therefore starts averaging from its current (pretrained) value.
- Buffers (BatchNorm running statistics) are not averaged: the averaged weights are validated and
  saved with the live buffers, which every rank holds alike (rank 0's, broadcast before validation).
  Averaging them would need them identical on every rank after each step, which DDP does not give.
- Each epoch the averaged weights are validated too (``val_loss_ema``, ``val_acc_ema`` in the record);
  ``model_selection.BestModel`` keeps them when they score better (see ``candidates`` there).
- The average and its step count are in every training-state checkpoint (``state_tensors``), so a
  resumed run continues it bit-exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .callbacks import Callback, RunState
from .errors import CheckpointError
from .inference import validation_metrics
from .sharding import full_state_dict, shard_like, sharded_parameters

EMA_SUFFIX = "_ema"
VALIDATION_KEYS = ("val_loss", "val_acc", "val_top5")


def decay_at(decay: float, step: int) -> float:
    """The decay of update number ``step`` (from 0): ``(1 + step) / (10 + step)`` until that reaches ``decay``."""
    return min(decay, (1 + step) / (10 + step))


class WeightEMA(Callback):
    """Keeps the average (``weights``, by parameter name) and validates it each epoch; ``run.ema`` is this."""

    def __init__(self, decay: float):
        self.decay = decay
        self.step = 0  # updates applied so far
        self.weights: dict[str, torch.Tensor] = {}
        self._saved_decay: float | None = None  # on resume: the checkpoint's
        self._restored: dict[str, torch.Tensor] = {}  # on resume: the checkpoint's average (whole), until on_fit_start

    def on_fit_start(self, trainer, run: RunState) -> None:
        """Start the average from the weights as training starts, or take over the checkpoint's."""
        params = dict(run.task.named_parameters())
        if self._restored:
            if self._restored.keys() != params.keys():
                raise CheckpointError(f"{run.resumed_from}: its weight average has other parameters than this model")
            self.weights = {name: shard_like(tensor.to(params[name].device, torch.float32), params[name])
                            for name, tensor in self._restored.items()}
            self._restored = {}
            if self._saved_decay != self.decay:
                trainer.announce(f"ema_decay {self.decay} applied from the resume point on (checkpoint had "
                                 f"{self._saved_decay})")
        else:
            self.weights = {name: param.detach().to(torch.float32, copy=True) for name, param in params.items()}
            if run.resumed_from is not None:
                trainer.announce(f"{run.resumed_from} holds no weight average: it starts from the resumed weights")
        run.ema = self

    def on_step_end(self, trainer, run: RunState) -> None:
        self.update(run.task)

    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s trainable parameters."""
        weight = 1.0 - decay_at(self.decay, self.step)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    self.weights[name].lerp_(param.detach().to(torch.float32), weight)
        self.step += 1

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the averaged weights inside the block; its own are put back, bit for bit, after."""
        params = sharded_parameters(model)  # after a forward FSDP2 may hold some whole
        live = {name: params[name].detach().clone() for name in self.weights}
        with torch.no_grad():
            for name, average in self.weights.items():
                params[name].copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in live.items():
                    params[name].copy_(value)

    def on_validation_end(self, trainer, run: RunState, record: dict) -> None:
        """The averaged weights' validation into ``record``: ``val_loss_ema``, ``val_acc_ema`` (``val_top5_ema``)."""
        with self.swapped_in(run.task):
            metrics = validation_metrics(run.task, run.val_loader, run.accelerator, run.config.tta)
        record.update({key + EMA_SUFFIX: metrics[key] for key in VALIDATION_KEYS if key in metrics})

    def state_dict(self) -> dict:
        return {"step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.step, self._saved_decay = state.get("step", 0), state.get("decay")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.weights)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._restored = tensors
