"""Which model a run keeps, and when it stops: the best epoch's weights, and early stopping.

Both follow one validation metric: ``val_acc`` (higher is better; equal accuracies are told apart
by the lower ``val_loss``, which matters on small validation sets where many epochs tie) or
``val_loss`` (lower is better). With a weight average (``--ema-decay``) each epoch has two candidates,
the live weights and the average (``val_acc_ema``...): both follow the better one (ties: the live).
Their state (best value and epoch, epochs without improvement) is saved in every training-state
checkpoint, so a resumed or requeued run makes the same choices as an uninterrupted one. Validation
metrics are identical on every rank (gathered), and the one decision that ends training is still
taken through a collective so no rank can go on alone.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from .callbacks import Callback, RunState
from .checkpoint import load_model, read_metadata, save_model
from .distributed import any_rank
from .ema import EMA_SUFFIX, VALIDATION_KEYS
from .errors import CheckpointError, check_choice
from .lora import file_weights
from .training_state import CHECKPOINTS_DIR

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


def best_candidate(record: dict, metric: str) -> tuple[dict, str]:
    """The better of the epoch's live weights (``record``) and, when it was validated, their average: its
    metrics as a record of their own, and "live" or "ema" (ties go to the live weights)."""
    candidates = [(record, "live")]
    if "val_acc" + EMA_SUFFIX in record:
        average = {key: record[key + EMA_SUFFIX] for key in VALIDATION_KEYS if key + EMA_SUFFIX in record}
        candidates.append(({"epoch": record["epoch"], **average}, "ema"))
    return max(candidates, key=lambda candidate: score(candidate[0], metric))


def _holding(run: RunState, best: dict):
    """A block in which the task holds ``best``'s weights of its epoch: its own, or the average swapped in."""
    return run.ema.swapped_in(run.task) if best.get("weights") == "ema" else nullcontext()


def _holds(path: Path, best: dict) -> bool:
    """Whether the model file at ``path`` records exactly ``best``'s epoch and metrics."""
    try:
        return path.is_file() and read_metadata(path).get("training") == best
    except CheckpointError:  # not a model file of ours, or damaged: it does not hold them
        return False


def describe(record: dict) -> str:
    top5 = f", val_top5 {record['val_top5']:.4f}" if "val_top5" in record else ""
    average = "'s weight average" if record.get("weights") == "ema" else ""
    return (f"epoch {record['epoch']}{average} (val_acc {record['val_acc']:.4f}, val_loss {record['val_loss']:.4f}"
            f"{top5})")


class BestModel(Callback):
    """Keeps the best epoch's model as ``model.safetensors`` and the last one as ``last.safetensors``.

    ``load_best_at_end``: after training the task holds the best epoch's weights (as HF Trainer's
    ``load_best_model_at_end``), so saving, validating and predicting use them; else the last ones.
    The best weights are kept in host memory (and in the model file), one copy per process; a resumed
    run takes them only from where the best epoch's record proves them (see ``_recover``).
    """

    def __init__(self, metric: str = "val_acc", load_best_at_end: bool = True):
        check_choice("metric_for_best", metric, METRICS_FOR_BEST)
        self.metric = metric
        self.load_best_at_end = load_best_at_end
        self.best: dict | None = None  # the best epoch's record
        self._weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, run: RunState, record: dict) -> None:
        best = score(self.best, self.metric) if self.best is not None else (-math.inf,)
        candidate, weights = best_candidate(record, self.metric)
        if score(candidate, self.metric) <= best:
            return
        record["best"] = True
        self.best = {k: candidate[k] for k in ("epoch", "val_acc", "val_loss", "val_top5") if k in candidate}
        if "val_acc" + EMA_SUFFIX in record:  # the weight average was a candidate: say which won
            self.best["weights"] = record["best_weights"] = weights
        with _holding(run, self.best):
            self._weights = {k: v.to("cpu", copy=True) for k, v in file_weights(run.task).items()}
            if run.output_dir is not None:  # written before the epoch's training state, so never behind it
                trainer.save_checkpoint(run.output_dir / MODEL_FILENAME, training=self.best)

    def on_fit_start(self, trainer, run: RunState) -> None:
        if self.best is not None and self._weights is None:  # resumed after a best epoch was chosen
            self._recover(trainer, run)

    def _recover(self, trainer, run: RunState) -> None:
        """Find the best epoch's weights chosen before the resume: the resumed checkpoint when it is that
        epoch's end, else a model file whose recorded epoch and metrics are the best's (this output dir's,
        or that of the run the checkpoint belongs to). This output dir's model file then holds them (it
        may lack them: another output dir); one holding another epoch (written by the continuation this
        run replaces) is moved aside, never taken for the best."""
        position, best = run.position, self.best
        files = [run.output_dir / MODEL_FILENAME] if run.output_dir is not None else []
        of_checkpoint = run.resumed_from.parent.parent / MODEL_FILENAME  # the model file of the checkpoint's run
        if run.resumed_from.parent.name == CHECKPOINTS_DIR and of_checkpoint.resolve() not in map(Path.resolve, files):
            files.append(of_checkpoint)
        at_its_end = (position.epoch, position.batch) == (best["epoch"] + 1, 0)
        if at_its_end and (best.get("weights") != "ema" or run.ema is not None):
            with _holding(run, best):
                self._weights = {k: v.to("cpu", copy=True) for k, v in file_weights(run.task).items()}
        else:
            source = next((path for path in files if _holds(path, best)), None)
            self._weights = load_model(source)[0] if source is not None else None
        if self._weights is None:
            warnings.warn(f"the best epoch so far, {describe(best)}, was chosen before the resume and its weights "
                          f"are in none of {', '.join(map(str, files)) or 'no model file'}: unless a later epoch "
                          "does better, the run ends with the last epoch's weights")
        if run.output_dir is None or not run.is_main_process or _holds(files[0], best):
            return
        if files[0].exists():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = files[0].with_name(f"model.replaced-{stamp}.safetensors")
            os.replace(files[0], aside)
            trainer.announce(f"{files[0]} did not hold this run's best epoch {best['epoch']}: moved to {aside}")
        if self._weights is not None:
            save_model(files[0], self._weights, {**run.task.metadata(), "training": best})

    def on_fit_end(self, trainer, run: RunState) -> None:
        if not run.history or self.best is None:
            return
        last = run.history[-1]
        if run.output_dir is not None:
            trainer.save_checkpoint(run.output_dir / LAST_MODEL_FILENAME,
                                    training={k: last[k] for k in self.best if k in last})
        holds_best = self.best["epoch"] == last["epoch"] and self.best.get("weights") != "ema"
        have_best = holds_best or self._weights is not None
        kept = self.best if self.load_best_at_end and have_best else last
        if kept is self.best and not holds_best:
            device = run.accelerator.device
            run.task.load_weights({k: v.to(device) for k, v in self._weights.items()}, "the best epoch's weights")
        run.model_epoch, run.model_is_ema = kept["epoch"], kept.get("weights") == "ema"
        message = f"best {describe(self.best)}"
        if run.output_dir is not None:
            message += f" -> {run.output_dir / MODEL_FILENAME}; last epoch {last['epoch']} -> " \
                       f"{run.output_dir / LAST_MODEL_FILENAME}"
        missing = "" if have_best else " (the best epoch's weights were not found: see the warning at the resume)"
        weights = "weight average" if run.model_is_ema else "weights"
        trainer.announce(f"{message}; the task now holds epoch {kept['epoch']}'s {weights}{missing}")

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
        value = score(best_candidate(record, self.metric)[0], self.metric)[0]
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
