"""The trainer's extension points: a :class:`Callback` has hooks called at fixed points of a run,
and every run keeps its state in one :class:`RunState` that the hooks read (and may change).

Order of the hooks in ``Trainer.finetune``::

    setup            the model is built, the optimizer is not: freeze here (strategies do)
    load_state_dict  on resume only: the callback's state from the checkpoint
    on_fit_start     everything is built, prepared and restored; before the first epoch
    on_epoch_start   at the start of each epoch (not when resuming mid-epoch); changing
                     requires_grad or adding param groups here is fine: the trainer re-syncs
                     the distributed wrapper and checks the ranks afterwards
    on_step_end      after every optimizer step
    on_validation_end(record)   the epoch's metrics are known; the record may be annotated
    on_epoch_end(record)        the record is final and in ``run.history``
    on_fit_end       training finished normally (``run.stop_reason`` says why, if early)
    teardown         always, also after an exception

Hooks run on every process; do file I/O on ``run.accelerator.is_main_process`` only, and make
every decision that changes training identical on all ranks (the trainer checks parameters and
param groups after each transition). ``state_dict`` must return JSON-able data: it is saved in
every training-state checkpoint and handed back to ``load_state_dict`` on resume, so a resumed run
continues exactly where the interrupted one was. Tensors (an average of the weights) go through
``state_tensors`` (whole tensors: every rank calls it, gathering sharded ones is collective) and
come back, whole, to ``load_state_tensors`` on every rank, right after ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # for the annotations only: those modules import this one
    from accelerate import Accelerator
    import torch
    from torch import nn
    from torch.optim import Optimizer
    from torch.utils.data import DataLoader

    from .config import TrainerConfig
    from .data import ImageClassificationData
    from .ema import WeightEMA
    from .finetuning import BaseFinetuning
    from .loss_guard import LossGuard
    from .schedule import WarmupSchedule
    from .task import ImageClassifier


@dataclass
class Position:
    """Where training stands: ``batch`` batches of ``epoch`` are done (0: the epoch has not begun)."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    samples_done: int = 0  # of this epoch, over all ranks (resume with another process count)
    loss_sum: float = 0.0  # this epoch's finite training losses so far over all ranks, as of the last check
    seen: int = 0
    lost_images: int = 0  # of ``seen``: images whose batch loss was not finite (left out of loss_sum)


@dataclass
class RunState:
    """Everything one ``finetune`` call holds. Built by the trainer; nothing of it outlives the run."""

    config: TrainerConfig
    accelerator: Accelerator
    task: ImageClassifier  # the model itself (never wrapped)
    data: ImageClassificationData
    strategy: BaseFinetuning
    signature: dict = field(default_factory=dict)  # what a resumed run must share with its checkpoint
    callbacks: CallbackList | None = None
    model: nn.Module | None = None  # what training calls: the task, or its DDP wrapper
    sharded: bool = False  # FSDP2: the task's parameters are DTensor shards (fsdp.shard_for_training)
    optimizer: Optimizer | None = None
    schedule: WarmupSchedule | None = None
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    steps_per_epoch: int = 0
    epoch_batches: int = 0  # batches of the current epoch on this process
    position: Position = field(default_factory=Position)
    loss_guard: LossGuard | None = None  # loss totals on the device and the non-finite checks
    channels_last: bool = False  # the model and its inputs are channels_last (the same on every rank)
    compile_with: tuple[str, str | None] | None = None  # torch.compile's (backend, mode) for training; None: eager
    compiled: tuple[nn.Module, Callable] | None = None  # (the wrapper compiled, its compiled forward)
    feature_loader: DataLoader | None = None  # cached frozen features (feature_cache), while they are valid
    resumed_from: Path | None = None
    last_checkpoint: Path | None = None
    saved_position: Position | None = None  # a copy of the position last_checkpoint holds
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    stop_reason: str | None = None  # set (identically on every rank) to end training after this epoch
    model_epoch: int | None = None  # after training: the epoch whose weights the task holds (BestModel sets it)
    model_is_ema: bool = False  # after training: the task holds model_epoch's weight average (BestModel sets it)
    ema: WeightEMA | None = None  # the average of the weights (ema_decay), set as training starts

    @property
    def ema_weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name ({} without an average): for the rank check."""
        return self.ema.weights if self.ema is not None else {}

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def output_dir(self) -> Path | None:
        return Path(self.config.output_dir) if self.config.output_dir else None


class Callback:
    """Base class: override the hooks you need; each receives the trainer and the run's state."""

    def setup(self, trainer, run: RunState) -> None:
        """Before the optimizer exists: freeze what should not train at first."""

    def on_fit_start(self, trainer, run: RunState) -> None:
        """Everything is built (and restored on resume); training starts next."""

    def on_epoch_start(self, trainer, run: RunState) -> None:
        """Start of ``run.position.epoch`` (skipped when resuming in the middle of an epoch)."""

    def on_step_end(self, trainer, run: RunState) -> None:
        """After optimizer step ``run.position.global_step``."""

    def on_validation_end(self, trainer, run: RunState, record: dict) -> None:
        """Validation of the epoch is done; ``record`` holds its metrics and may be annotated."""

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        """The epoch is over; ``record`` is final and appended to ``run.history``."""

    def on_fit_end(self, trainer, run: RunState) -> None:
        """Training is over (all epochs, or stopped early with ``run.stop_reason``)."""

    def teardown(self, trainer, run: RunState) -> None:
        """Always called last, also when training raised: release what ``setup`` took."""

    def state_dict(self) -> dict:
        """JSON-able state saved in training checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (called before ``on_fit_start`` on resume)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Whole tensors saved in training checkpoints beside :meth:`state_dict` (every rank calls this)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (on resume, right after :meth:`load_state_dict`)."""


class CallbackList:
    """Calls a hook on every callback in order; names their saved states by class (``Name#2`` for repeats)."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)
        counts: dict[str, int] = {}
        self.keys = []
        for callback in self.callbacks:
            name = type(callback).__name__
            counts[name] = counts.get(name, 0) + 1
            self.keys.append(name if counts[name] == 1 else f"{name}#{counts[name]}")

    def call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def teardown(self, trainer, run: RunState) -> None:
        """``teardown`` on every callback even if one raises; the first error is raised after."""
        first_error = None
        for callback in self.callbacks:
            try:
                callback.teardown(trainer, run)
            except Exception as error:  # noqa: BLE001 - keep releasing the others' resources
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def state_dict(self) -> dict[str, dict]:
        return {key: callback.state_dict() for key, callback in zip(self.keys, self.callbacks)}

    def load_state_dict(self, states: dict[str, dict], tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Each callback's state and its tensors (``tensors``' keys as :meth:`state_tensors` names them)."""
        for key, callback in zip(self.keys, self.callbacks):
            callback.load_state_dict(states.get(key, {}))
            prefix = f"{key}/"
            callback.load_state_tensors({name[len(prefix):]: tensor for name, tensor in (tensors or {}).items()
                                         if name.startswith(prefix)})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every callback's tensors as ``<key>/<name>`` (collective: every rank calls it)."""
        return {f"{key}/{name}": tensor for key, callback in zip(self.keys, self.callbacks)
                for name, tensor in callback.state_tensors().items()}
