"""Experiment trackers (TensorBoard, W&B, MLflow, Comet, Aim) through Accelerate's tracking API.

``report_to`` names them as Accelerate does (comma-separated, or ``all`` for every installed one);
the Accelerator is built with ``log_with`` and the output dir as ``project_dir``, and the
:class:`Trackers` callback logs what the run's own files hold: the train loss and every group's
lr every ``log_every_n_steps`` optimizer steps (``train/loss``, ``lr/group_N``), each epoch's
numbers at the global step that ends it (``epoch/...``), and the strategy's transitions (which
layers joined, when). Steps are optimizer steps, so they keep counting across a resume; a resumed
TensorBoard run purges whatever the interrupted one logged after its checkpoint, and a W&B run
continues under the run id kept in the training state. Only the main process logs (Accelerate).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from accelerate.utils import (
    is_aim_available,
    is_comet_ml_available,
    is_mlflow_available,
    is_tensorboard_available,
    is_wandb_available,
)

from .callbacks import Callback, RunState
from .errors import ConfigError
from .metrics import LossWindow

AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
             "comet_ml": is_comet_ml_available, "aim": is_aim_available}
REPORT_TO = ("none", *AVAILABLE, "all")
INSTALL = {"tensorboard": 'pip install -e ".[tracking]" (or pip install tensorboard)',
           "wandb": "pip install wandb", "mlflow": "pip install mlflow", "comet_ml": "pip install comet_ml",
           "aim": "pip install aim"}


def tracker_names(report_to: str | None) -> list[str]:
    """The names in ``report_to`` ("tensorboard,wandb"; "none": []); unknown names are an error."""
    names = [name.strip() for name in (report_to or "none").split(",") if name.strip()]
    unknown = [name for name in names if name not in REPORT_TO]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(REPORT_TO)}")
    return [name for name in dict.fromkeys(names) if name != "none"]


def check_trackers(report_to: str | None, output_dir: str | None) -> list[str]:
    """Accelerate's ``log_with`` for ``report_to`` ("all": the installed ones); fails before training."""
    names = tracker_names(report_to)
    if "all" in names:
        names = [name for name, available in AVAILABLE.items() if available()]
        if not names:
            raise ConfigError('report_to=all but no tracker is installed: pip install -e ".[tracking]" '
                              "for TensorBoard (or pip install wandb / mlflow / comet_ml / aim)")
    missing = [name for name in names if not AVAILABLE[name]()]
    if missing:
        raise ConfigError(f"report_to={report_to}: {missing[0]} is not installed; {INSTALL[missing[0]]}")
    if names and not output_dir:
        raise ConfigError(f"report_to={report_to} needs an output_dir (--output-dir): trackers write under it")
    return names


def flatten_config(config) -> dict[str, str | int | float | bool]:
    """``section.key -> value`` of a RunConfig (or a TrainerConfig), every value a str, int, float or bool."""
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)

    values = dataclasses.asdict(config)
    visit("", values if hasattr(config, "trainer") else {"trainer": values})  # a TrainerConfig is the trainer section
    return flat


def epoch_values(record: dict, first_step: int) -> dict[str, float | str]:
    """What a tracker gets of an epoch record: its numbers, and as text the layers that joined at the
    epoch's start (``first_step``: its first optimizer step)."""
    values = {f"epoch/{key}": value for key, value in record.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    values["epoch/param_groups"] = len(record["lr"])
    if record.get("joined"):
        values["strategy/joined"] = (f"epoch {record['epoch']} (from step {first_step}): "
                                     f"{', '.join(record['joined'])} joined training")
    return values


class Trackers(Callback):
    """Logs the run to Accelerate's trackers (the Accelerator must have been built with ``log_with``).

    ``config``: the run's settings (a RunConfig or TrainerConfig), stored flattened as the run's
    hyperparameters. The run is named after the output dir.
    """

    def __init__(self, config, log_every_n_steps: int = 10):
        self.config = flatten_config(config)
        self._window = LossWindow(log_every_n_steps)
        self.run_id: str | None = None  # the W&B run to continue after a resume
        self._started = False
        self._first_step = 1  # of the current epoch

    def on_fit_start(self, trainer, run: RunState) -> None:
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        # TensorBoard drops every event from this step on in the files already there: a resumed run
        # replaces what the interrupted one logged after its checkpoint, a fresh run everything
        purge_step = run.position.global_step + 1 if run.resumed_from else 0
        run.accelerator.init_trackers(Path(run.config.output_dir).resolve().name, config=self.config, init_kwargs={
            "tensorboard": {"purge_step": purge_step}, "wandb": {"id": self.run_id, "resume": "allow"}})
        self._started = True
        self._window.start(run.position)

    def on_epoch_start(self, trainer, run: RunState) -> None:
        self._window.start()
        self._first_step = run.position.global_step + 1

    def on_step_end(self, trainer, run: RunState) -> None:
        record = self._window.step_record(trainer, run)
        if record is not None:
            values = {"train/loss": record["train_loss"], "train/epoch": record["epoch"]}
            values.update({f"lr/group_{index}": lr for index, lr in enumerate(record["lr"])})
            run.accelerator.log(values, step=record["step"])

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        run.accelerator.log(epoch_values(record, self._first_step), step=run.position.global_step)

    def teardown(self, trainer, run: RunState) -> None:
        if self._started:  # Accelerator.end_training would also end the process group, which outlives the run
            for tracker in run.accelerator.trackers:
                tracker.finish()
            self._started = False

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")
