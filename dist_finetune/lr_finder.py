"""``dist-finetune lr-find`` (``Trainer.lr_find``): fastai's ``lr_find``, an exponential lr sweep over what the
strategy's first epoch trains, with the run's optimizer settings; the loss against the lr, and a suggestion.

The sweep trains a copy of the model (its weights, BatchNorm statistics, ``requires_grad`` flags and device
stay as they were) and puts every random generator back afterwards. Each step's loss is the mean over the
ranks (every rank steps through its shard, gradients synced), so every rank sees the same curve and stops
at the same step; the main process writes the files.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import TrainerConfig, setting
from .distributed import release_wrappers
from .errors import ConfigError, NonFiniteLossError
from .finetuning import BaseFinetuning, build_optimizer
from .mixing import training_loss
from .plots import MATPLOTLIB_HINT, PlotsUnavailable, plot_lr_find
from .run_files import write_atomic
from .training_state import capture_rng, restore_rng

LR_FIND_JSON = "lr_find.json"
LR_FIND_PNG = "lr_find.png"


@dataclass
class LRSweep:
    """The sweep's settings (``lr-find`` flags); the run's other settings are ``train``'s."""

    start_lr: float = setting(1e-7, "the sweep's first head lr")
    end_lr: float = setting(10.0, "the sweep's last head lr")
    num_steps: int = setting(100, "optimizer steps, the lr growing by the same factor each (the training data "
                                  "is cycled when it has fewer batches)")
    smoothing: float = setting(0.98, "weight of the past in the smoothed loss (an exponential moving average, "
                                     "bias-corrected)")
    divergence: float = setting(4.0, "stop once the smoothed loss exceeds this many times its minimum")

    def __post_init__(self) -> None:
        if not 0 < self.start_lr < self.end_lr:
            raise ConfigError(f"lr-find needs 0 < start_lr < end_lr, got {self.start_lr} and {self.end_lr}")
        if self.num_steps < 2:
            raise ConfigError(f"num_steps must be at least 2, got {self.num_steps}")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.divergence <= 1:
            raise ConfigError(f"divergence must be above 1, got {self.divergence}")


@dataclass
class LRFinderResult:
    """The curve (one point per finished step) and the suggested head lr (``trainer.lr``)."""

    lrs: list[float]
    losses: list[float]  # each step's loss, mean over the ranks
    smoothed: list[float]
    suggestion: float | None  # the steepest descent of the smoothed loss; None with fewer than 2 points
    min_loss_lr: float  # the lr of the lowest smoothed loss
    stopped_early: str | None  # why the sweep ended before its last lr (divergence); None if it did not

    def save(self, output_dir) -> list[Path]:
        """``lr_find.json`` and, with matplotlib, ``lr_find.png``: the paths written."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written = [output_dir / LR_FIND_JSON]
        write_atomic(written[0], json.dumps(asdict(self), indent=1).encode())
        try:
            written.append(plot_lr_find(self.lrs, self.losses, self.smoothed, self.suggestion,
                                        output_dir / LR_FIND_PNG))
        except PlotsUnavailable:
            print(f"lr-find: no {LR_FIND_PNG}: {MATPLOTLIB_HINT}")
        return written


def sweep_lrs(start_lr: float, end_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` lrs from exactly ``start_lr`` to exactly ``end_lr``, each the last times one factor."""
    return [start_lr ** (1 - step / (num_steps - 1)) * end_lr ** (step / (num_steps - 1))
            for step in range(num_steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average, divided by ``1 - beta^n`` so early points are not pulled towards 0."""
    average, smoothed = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** count))
    return smoothed


def steepest_lr(lrs: list[float], smoothed: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest per factor of lr (the most negative slope against log lr)."""
    if len(lrs) < 2:
        return None
    slopes = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs)))
    return lrs[int(np.argmin(slopes))]


def find_lr(task, strategy: BaseFinetuning, config: TrainerConfig, accelerator, loader,
            class_weights: list[float] | None, sweep: LRSweep) -> LRFinderResult:
    """Sweep a copy of ``task`` frozen as ``strategy`` freezes it for epoch 0, with ``config``'s optimizer
    (weight decay, layer decay, clipping, accumulation, label smoothing) and ``loader`` (the training loader,
    not yet prepared); the main process writes the result to ``config.output_dir`` when that is set.

    Raises NonFiniteLossError, before any update and with nothing written, when the first loss is not finite.
    """
    if config.sharding == "fsdp2":
        raise ConfigError("lr-find trains the whole model on every rank (DDP), not sharded: run it without "
                          "trainer.sharding fsdp2 (from the config or the accelerate launch config)")
    rng = capture_rng(accelerator.device)
    set_seed(config.seed)
    model = copy.deepcopy(task)
    try:
        strategy.freeze_before_training(model)
        optimizer = build_optimizer(model, config)
        strategy.call_finetune_function(model, 0, optimizer)  # what joins at epoch 0 trains in the first epoch
        scales = [group["lr"] / config.lr for group in optimizer.param_groups]  # layer decay, lr / denom
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        weights = torch.tensor(class_weights, device=accelerator.device) if class_weights else None
        batches = _cycle(loader)
        lrs, losses, stopped = sweep_lrs(sweep.start_lr, sweep.end_lr, sweep.num_steps), [], None
        bar = tqdm(lrs, desc="lr-find", leave=False, dynamic_ncols=True,
                   disable=True if not (config.progress_bar and accelerator.is_main_process) else None)
        model.train()
        for lr in bar:
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            loss = _step(model, optimizer, batches, accelerator, config, weights)
            if not math.isfinite(loss) and not losses:
                raise NonFiniteLossError(
                    f"the loss of the first batch is {loss}, before any update (lr {lr:.1e}): the model's weights "
                    "(model.weights, --weights) or the images hold non-finite values; nothing was written")
            if not math.isfinite(loss):
                stopped = f"the loss became {loss} at lr {lr:.2e}"
                break
            losses.append(loss)
            smoothed = smooth(losses, sweep.smoothing)
            if smoothed[-1] > sweep.divergence * min(smoothed):
                stopped = f"the smoothed loss passed {sweep.divergence:g} x its minimum at lr {lr:.2e}"
                break
        batches.close()
    finally:
        release_wrappers(accelerator)
        restore_rng(*rng, accelerator.device)
    lrs, smoothed = lrs[:len(losses)], smooth(losses, sweep.smoothing)
    result = LRFinderResult(lrs, losses, smoothed, steepest_lr(lrs, smoothed), lrs[int(np.argmin(smoothed))],
                            stopped)
    if accelerator.is_main_process and config.output_dir:
        result.save(config.output_dir)
    return result


def _cycle(loader):
    """The loader's batches, epoch after epoch (each reshuffled as training's epochs are)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _step(model, optimizer, batches, accelerator, config: TrainerConfig, class_weights) -> float:
    """One optimizer step (its accumulated batches): their mean loss over the ranks. A non-finite loss is
    returned before its backward, on every rank alike (the mean is theirs), so no rank updates with it."""
    total, count = 0.0, 0
    while True:
        images, labels = next(batches)
        with accelerator.accumulate(model):
            loss = training_loss(model(images).float(), labels, class_weights, config.label_smoothing)
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(mean):
                return mean
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total, count = total + mean, count + 1
        if accelerator.sync_gradients:
            return total / count
