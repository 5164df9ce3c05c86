"""The training loss's totals, and the checks that stop a run before NaN reaches a file.

The totals stay on the device between checks, so a GPU step never waits for the host; a check
reduces them over ranks once per position (a periodic check, the step log, a cadence save at one
step share one reduction). An epoch's train loss is the mean over the images whose batch loss was
finite; the record says how many batches were not.

When a non-finite loss stops the run: with a GradScaler (fp16 on a GPU) such a step is one the
scaler skips, and the weights do not move, so the run stops only once the last
``check_every_n_steps`` optimizer steps all had a non-finite loss on some rank, however many epochs
they span (scaling cannot repair a forward overflow). Without one (fp32, bf16, or fp16 on a CPU,
where accelerate has no scaler) the optimizer applies NaN gradients, so one non-finite loss stops
it. A non-finite validation stops it before any model file of that epoch is written, and no model
file or checkpoint is ever written from weights or buffers that are not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .callbacks import Position
from .distributed import any_rank
from .errors import NonFiniteLossError
from .sharding import local_tensor

ADVICE = "Lower the lr or set max_grad_norm (a resume from that checkpoint applies them)."


@dataclass(frozen=True)
class LossTotals:
    """One epoch's training-loss totals over all ranks, as of a check."""

    loss_sum: float = 0.0  # finite batch losses x their batch sizes
    finite_images: int = 0  # images whose batch loss was finite
    images: int = 0  # every image trained on
    non_finite: int = 0  # batches whose loss was NaN or infinite
    lost_window: bool = False  # the last check_every_n_steps optimizer steps each had a non-finite loss on a rank

    @property
    def mean_loss(self) -> float:
        """The train loss: NaN when no batch had a finite loss (never a made-up 0.0)."""
        return self.loss_sum / self.finite_images if self.finite_images else math.nan


@dataclass
class RunningTotals:
    """One rank's totals of the epoch so far, as float64 device tensors (no host sync): ``LossTotals``'
    sums before the reduction over ranks."""

    loss_sum: torch.Tensor
    finite_images: torch.Tensor
    images: torch.Tensor
    non_finite: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """The sums in field order, for one reduction over ranks."""
        return torch.stack([getattr(self, name) for name in SUMMED])


SUMMED = [field.name for field in fields(RunningTotals)]


def _last_good(last_checkpoint) -> str:
    return f"last good checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}"


class LossGuard:
    """The running totals of one run's epochs and the non-finite checks (every rank holds one)."""

    def __init__(self, accelerator, check_every_n_steps: int):
        self.accelerator = accelerator
        self.check_every_n_steps = check_every_n_steps
        self.skips_non_finite = accelerator.scaler is not None  # a GradScaler skips non-finite steps
        device = accelerator.device
        # whether each of the last check_every_n_steps optimizer steps had a non-finite loss on this rank (a
        # ring, kept across epochs): summed over ranks at a check, since one rank's overflow makes the scaler
        # skip the step on every rank, and which rank overflows can change from step to step
        self._recent_lost = torch.zeros(check_every_n_steps, dtype=torch.bool, device=device)
        self._steps = 0  # optimizer steps this process has taken (the same on every rank)
        self._step_lost = torch.zeros((), dtype=torch.bool, device=device)
        self._epoch: RunningTotals | None = None  # this rank's, during an epoch
        self._synced: tuple[tuple[int, int], LossTotals] | None = None

    def start_epoch(self, position: Position) -> None:
        """Totals from ``position``: those a resumed checkpoint carried count once, on the main process."""
        carried = LossTotals(position.loss_sum, position.seen - position.lost_images, position.seen)
        if not self.accelerator.is_main_process:
            carried = LossTotals()
        device = self.accelerator.device
        self._epoch = RunningTotals(**{name: torch.tensor(float(getattr(carried, name)), dtype=torch.float64,
                                                          device=device) for name in SUMMED})
        self._synced = None

    def add(self, loss: torch.Tensor, images: int, step_done: bool) -> None:
        """One batch's loss (on the device, no host sync); ``step_done``: the optimizer stepped after it."""
        value = loss.detach().double()
        finite = torch.isfinite(value)
        sums = self._epoch
        sums.loss_sum += torch.where(finite, value * images, 0.0)
        sums.finite_images += finite.double() * images
        sums.images += images
        sums.non_finite += (~finite).double()
        self._step_lost |= ~finite
        if step_done:
            self._recent_lost[self._steps % self.check_every_n_steps] = self._step_lost
            self._steps += 1
            self._step_lost.fill_(False)

    def totals(self, position: Position) -> LossTotals | None:
        """The totals over all ranks, also written into ``position`` (None outside an epoch)."""
        if self._epoch is None:
            return None
        here = (position.epoch, position.batch)
        if self._synced is None or self._synced[0] != here:
            values = torch.cat([self._epoch.stacked(), self._recent_lost.double()])
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="sum")
            values = values.tolist()
            epoch, recent = dict(zip(SUMMED, values)), values[len(SUMMED):]
            lost_window = self._steps >= self.check_every_n_steps and all(recent)
            totals = LossTotals(loss_sum=epoch["loss_sum"], finite_images=int(epoch["finite_images"]),
                                images=int(epoch["images"]), non_finite=int(epoch["non_finite"]),
                                lost_window=lost_window)
            self._synced = (here, totals)
        totals = self._synced[1]
        position.loss_sum, position.seen = totals.loss_sum, totals.images
        position.lost_images = totals.images - totals.finite_images
        return totals

    def check(self, position: Position, last_checkpoint) -> LossTotals | None:
        """Stop (every rank alike) on a non-finite training loss; see the module docstring for when."""
        totals = self.totals(position)
        lost = totals is not None and (totals.lost_window if self.skips_non_finite else totals.non_finite)
        if lost:
            skipped = (f"the last {self.check_every_n_steps} optimizer steps all had one (the GradScaler skipped "
                       "them); " if self.skips_non_finite else "")
            raise NonFiniteLossError(
                f"non-finite training loss in epoch {position.epoch} by step {position.global_step} (checked every "
                f"{self.check_every_n_steps} steps); {skipped}{_last_good(last_checkpoint)}. {ADVICE}")
        return totals

    def end_epoch(self, position: Position, last_checkpoint) -> LossTotals:
        """The epoch's last check (no NaN ever reaches its checkpoint); its totals."""
        totals = self.check(position, last_checkpoint)
        self._epoch = self._synced = None
        return totals

    @staticmethod
    def check_validation(record: dict, position: Position, last_checkpoint) -> None:
        """Stop on a non-finite validation, before the epoch's model file or checkpoint is written."""
        if not all(math.isfinite(record[name]) for name in ("val_loss", "val_acc")):
            raise NonFiniteLossError(
                f"non-finite validation after epoch {record['epoch']} (val_loss {record['val_loss']}, val_acc "
                f"{record['val_acc']}, step {position.global_step}): the weights are not usable and nothing of this "
                f"epoch was saved; {_last_good(last_checkpoint)}. {ADVICE}")


def refuse_non_finite_weights(accelerator, state: dict[str, torch.Tensor], target, last_checkpoint) -> None:
    """Stop (every rank alike) before ``target`` is written if any floating-point tensor of ``state`` (a
    parameter, or a buffer such as BatchNorm's running statistics, which a finite training loss does not
    vouch for) holds NaN or infinity. Each rank checks what it holds (its shard of a sharded tensor);
    one device sync and one all-reduce."""
    names = [name for name, tensor in state.items() if tensor.is_floating_point()]
    finite = torch.stack([torch.isfinite(local_tensor(state[name])).all() for name in names]).tolist() if names else []
    bad = [name for name, ok in zip(names, finite) if not ok]
    if any_rank(accelerator, bool(bad)):
        shown = (", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")) if bad else \
            "a shard another rank holds"
        raise NonFiniteLossError(f"not writing {target}: non-finite values in {shown}; {_last_good(last_checkpoint)}. "
                                 f"{ADVICE}")
