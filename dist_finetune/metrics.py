"""The run's own log: one line per epoch printed and appended to ``metrics.jsonl``, and every
``log_every_n_steps`` optimizer steps the train loss and every group's lr appended to ``steps.jsonl``.

Lines are written as soon as they are known, so a crash or a preemption never loses what came
before; a resumed run keeps the lines up to the checkpoint it resumes from and drops the rest (the
resumed run writes them again), so neither file ever holds an epoch or a step twice. That rewrite
replaces the file atomically: a kill during it leaves the old file whole. Only the main process
touches the files; the others receive its records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .callbacks import Callback, RunState
from .distributed import from_main_process
from .run_files import read_jsonl, write_atomic

METRICS_FILENAME = "metrics.jsonl"
STEPS_FILENAME = "steps.jsonl"


def _rewrite(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _totals(position) -> tuple[float, int, int]:
    return position.loss_sum, position.seen, position.seen - position.lost_images


def format_record(record: dict) -> str:
    """The printed line of one epoch."""
    lrs = ", ".join(f"{lr:.2e}" for lr in record["lr"])
    top5 = f" top5 {record['val_top5']:.3f}" if "val_top5" in record else ""
    average = f"  ema: val_loss {record['val_loss_ema']:.4f} val_acc {record['val_acc_ema']:.3f}" \
        if "val_acc_ema" in record else ""
    best = f"  *best{' (ema)' if record.get('best_weights') == 'ema' else ''}*" if record.get("best") else ""
    return (f"epoch {record['epoch']}: train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_acc {record['val_acc']:.3f}{top5}{average}  {record['images_per_s']:.1f} img/s  lr [{lrs}]{best}")


class LossWindow:
    """The step record every ``every`` optimizer steps: the mean train loss over the steps since the
    previous record (over all ranks) and every group's lr. Identical on every rank.

    Start it at the beginning of each epoch (``start()``) and, after a resume, at the totals the
    checkpoint carried (``start(run.position)``), so a resumed run logs the same numbers.
    """

    def __init__(self, every: int):
        self.every = every
        self._start = (0.0, 0, 0)  # (loss sum, images, images with a finite loss) of the epoch at the previous record

    def start(self, position=None) -> None:
        self._start = _totals(position) if position is not None else (0.0, 0, 0)

    def step_record(self, trainer, run: RunState) -> dict | None:
        """The record of step ``run.position.global_step``, or None when no record is due (every rank calls this)."""
        position = run.position
        if position.global_step % self.every:
            return None
        trainer.check_training(run)  # one sync of the loss totals (every rank reaches this step)
        loss_sum, seen, finite = self._start
        self._start = _totals(position)
        if position.seen == seen:
            return None
        finite = self._start[2] - finite
        return {"step": position.global_step, "epoch": position.epoch,
                "train_loss": (position.loss_sum - loss_sum) / finite if finite else math.nan,
                "lr": [group["lr"] for group in run.optimizer.param_groups]}


class MetricsLogger(Callback):
    """Prints and saves each epoch's record (``run.history``) and a per-step train loss / lr log."""

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = log_every_n_steps
        self._window = LossWindow(log_every_n_steps)

    def on_fit_start(self, trainer, run: RunState) -> None:
        position, out = run.position, run.output_dir
        kept_epochs = position.epoch if run.resumed_from else 0
        kept_steps = position.global_step if run.resumed_from else 0
        records = []
        if out is not None and run.is_main_process:
            records = [r for r in read_jsonl(out / METRICS_FILENAME) if r["epoch"] < kept_epochs]
            _rewrite(out / METRICS_FILENAME, records)
            _rewrite(out / STEPS_FILENAME, [s for s in read_jsonl(out / STEPS_FILENAME) if s["step"] <= kept_steps])
        run.history[:] = from_main_process(run.accelerator, records)
        self._window.start(position)

    def on_epoch_start(self, trainer, run: RunState) -> None:
        self._window.start()

    def on_step_end(self, trainer, run: RunState) -> None:
        record = self._window.step_record(trainer, run)
        if record is not None and run.output_dir is not None and run.is_main_process:
            _append(run.output_dir / STEPS_FILENAME, record)

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        trainer.announce(format_record(record))
        if run.output_dir is not None and run.is_main_process:
            _append(run.output_dir / METRICS_FILENAME, record)
