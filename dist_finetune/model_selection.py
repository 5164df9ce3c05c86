"""Which model a run keeps, and when it stops: the best epoch's weights, and early stopping.

Both follow one validation metric: ``val_acc`` (higher is better; equal accuracies are told apart
by the lower ``val_loss``, which matters on small validation sets where many epochs tie) or
``val_loss`` (lower is better). Their state (best value and epoch, epochs without improvement) is
saved in every training-state checkpoint, so a resumed or requeued run makes the same choices as
an uninterrupted one. Validation metrics are identical on every rank (gathered), and the one
decision that ends training is still taken through a collective so no rank can go on alone.
"""

from __future__ import annotations

import math

import torch

from .callbacks import Callback, RunState
from .distributed import any_rank
from .sharding import full_state_dict

MODEL_FILENAME = "model.safetensors"
LAST_MODEL_FILENAME = "last.safetensors"
METRICS_FOR_BEST = ("val_acc", "val_loss")


def score(record: dict, metric: str) -> tuple[float, ...]:
    """A key where larger is better: (val_acc, -val_loss) or (-val_loss,); a non-finite validation
    (NaN compares as neither better nor worse) is the worst of all, never an improvement."""
    if not all(math.isfinite(record[name]) for name in ("val_acc", "val_loss")):
        return (-math.inf,)
    if metric == "val_acc":
        return (record["val_acc"], -record["val_loss"])
    return (-record["val_loss"],)


def describe(record: dict) -> str:
    top5 = f", val_top5 {record['val_top5']:.4f}" if "val_top5" in record else ""
    return f"epoch {record['epoch']} (val_acc {record['val_acc']:.4f}, val_loss {record['val_loss']:.4f}{top5})"


class BestModel(Callback):
    """Keeps the best epoch's model as ``model.safetensors`` and the last one as ``last.safetensors``.

    ``load_best_at_end``: after training the task holds the best epoch's weights (as HF Trainer's
    ``load_best_model_at_end``), so saving, validating and predicting use them; else the last ones.
    The best weights are kept in host memory (and in the model file), one copy per process.
    """

    def __init__(self, metric: str = "val_acc", load_best_at_end: bool = True):
        if metric not in METRICS_FOR_BEST:
            raise ValueError(f"metric for best must be one of {METRICS_FOR_BEST}, got {metric!r}")
        self.metric = metric
        self.load_best_at_end = load_best_at_end
        self.best: dict | None = None  # the best epoch's record
        self._weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, run: RunState, record: dict) -> None:
        best = score(self.best, self.metric) if self.best is not None else (-math.inf,)
        if score(record, self.metric) <= best:
            return
        record["best"] = True
        self.best = {k: record[k] for k in ("epoch", "val_acc", "val_loss", "val_top5") if k in record}
        self._weights = {k: v.to("cpu", copy=True) for k, v in full_state_dict(run.task.state_dict()).items()}
        if run.output_dir is not None:  # written before the epoch's training state, so never behind it
            trainer.save_checkpoint(run.output_dir / MODEL_FILENAME, training=self.best)

    def on_fit_end(self, trainer, run: RunState) -> None:
        if not run.history or self.best is None:
            return
        last = run.history[-1]
        if run.output_dir is not None:
            trainer.save_checkpoint(run.output_dir / LAST_MODEL_FILENAME,
                                    training={k: last[k] for k in self.best if k in last})
        if self.load_best_at_end and self.best["epoch"] != last["epoch"]:
            self._load_best(trainer, run)
        kept = self.best if self.load_best_at_end else last
        message = f"best {describe(self.best)}"
        if run.output_dir is not None:
            message += f" -> {run.output_dir / MODEL_FILENAME}; last epoch {last['epoch']} -> " \
                       f"{run.output_dir / LAST_MODEL_FILENAME}"
        trainer.announce(f"{message}; the task now holds epoch {kept['epoch']}'s weights")

    def _load_best(self, trainer, run: RunState) -> None:
        weights = self._weights
        if weights is None:  # chosen before a resume: only the model file has it
            from .checkpoint import load_model

            weights, _ = load_model(run.output_dir / MODEL_FILENAME)
        run.task.load_weights({k: v.to(run.accelerator.device) for k, v in weights.items()}, "the best epoch's weights")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


class EarlyStopping(Callback):
    """Stops training when the metric has not improved by more than ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "val_acc"):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.waited = 0
        self.reason: str | None = None

    def on_fit_start(self, trainer, run: RunState) -> None:
        run.stop_reason = run.stop_reason or self.reason  # a resumed run that had already stopped stays stopped

    def on_validation_end(self, trainer, run: RunState, record: dict) -> None:
        value = score(record, self.metric)[0]
        if value > (-math.inf if self.best is None else self.best + self.min_delta):
            self.best, self.best_epoch, self.waited = value, record["epoch"], 0
        else:
            self.waited += 1
        if any_rank(run.accelerator, self.waited >= self.patience):
            best = "no finite value yet" if self.best is None else \
                f"best {self.best if self.metric == 'val_acc' else -self.best:.4f} at epoch {self.best_epoch}"
            self.reason = (f"early stopping after epoch {record['epoch']}: {self.metric} did not improve by more than "
                           f"{self.min_delta} for {self.patience} epoch(s) ({best})")
            run.stop_reason = self.reason
            trainer.announce(self.reason)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited, "reason": self.reason}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.waited, self.reason = state.get("waited", 0), state.get("reason")
