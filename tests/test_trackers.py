"""Experiment trackers: TensorBoard event files read back (tags, values, steps), also across a resume."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import BACKBONE, tiny_trainer

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune import trackers
from dist_finetune.callbacks import Callback
from dist_finetune.config import TrainerConfig
from dist_finetune.errors import ConfigError
from dist_finetune.run_files import read_jsonl

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SETTINGS = {"report_to": "tensorboard", "log_every_n_steps": 2, "save_every_n_steps": 4}
STOP_AT = 11  # after the cadence save at step 8 and the step record at 10: 10 is logged again on resume


class StopAt(Callback):
    def on_step_end(self, trainer, run) -> None:
        if run.position.global_step == STOP_AT:
            raise RuntimeError("stopped on purpose")


def finetune(tiny_data, out, callbacks=(), resume=None):
    seed_everything(0)
    task = ImageClassifier(num_classes=tiny_data.num_classes, backbone=BACKBONE, pretrained=False)
    trainer = tiny_trainer(output_dir=str(out), callbacks=list(callbacks), **SETTINGS)
    return trainer.finetune(task, tiny_data, strategy=("freeze_unfreeze", 1), resume=resume)


def scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / out.name))  # the tracker's project is named after the output dir
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_against_run_files(logged: dict, out) -> None:
    """Every step and epoch record of the run's own files is in TensorBoard once, at its step."""
    steps = read_jsonl(out / "steps.jsonl")
    epochs = read_jsonl(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(2, 19, 2))  # 6 steps per epoch x 3 epochs, every 2nd
    assert [step for step, _ in logged["train/loss"]] == [s["step"] for s in steps]  # once each, increasing
    for (step, value), record in zip(logged["train/loss"], steps):
        assert value == pytest.approx(record["train_loss"], rel=1e-6)
    for group in (0, 1):
        expected = [(s["step"], s["lr"][group]) for s in steps if len(s["lr"]) > group]
        assert [step for step, _ in logged[f"lr/group_{group}"]] == [step for step, _ in expected]
        assert [v for _, v in logged[f"lr/group_{group}"]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [step for step, _ in logged["epoch/val_acc"]] == [6, 12, 18]  # the global step ending each epoch
    for key in ("val_loss", "val_acc", "train_loss"):
        assert [v for _, v in logged[f"epoch/{key}"]] == pytest.approx([r[key] for r in epochs], rel=1e-6)
    assert [v for _, v in logged["epoch/param_groups"]] == [1, 2, 2]  # the backbone joins at epoch 1


def test_tensorboard_scalars_match_the_run_files(tiny_data, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_data, out)
    check_against_run_files(scalars(out), out)
    events = EventAccumulator(str(out / out.name))
    events.Reload()
    joined = events.Tensors("strategy/joined/text_summary")
    assert [e.step for e in joined] == [12]
    assert b"epoch 1 (from step 7): conv1+bn1, layer1" in joined[0].tensor_proto.string_val[0]
    hparams = yaml.safe_load(next(out.glob(f"{out.name}/*/hparams.yml")).read_text())
    assert hparams["trainer.log_every_n_steps"] == 2 and hparams["trainer.report_to"] == "tensorboard"


def test_resume_logs_every_step_once(tiny_data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    wandb_settings = []  # what each start hands W&B through accelerate
    init_trackers = Accelerator.init_trackers
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, init_kwargs=None: (
        wandb_settings.append(init_kwargs["wandb"]), init_trackers(self, name, config, init_kwargs))[1])
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        finetune(tiny_data, out, callbacks=[StopAt()])
    first = scalars(out)
    assert [step for step, _ in first["train/loss"]] == [2, 4, 6, 8, 10]  # 10 is past the checkpoint at 8
    state = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    run_id = state["callbacks"]["Trackers"]["run_id"]

    finetune(tiny_data, out, resume="latest")  # a new Trainer continues from step 8
    check_against_run_files(scalars(out), out)  # step 10 once: the interrupted run's is purged
    state = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["callbacks"]["Trackers"]["run_id"] == run_id
    assert wandb_settings == [{"id": run_id, "resume": "allow"}] * 2  # W&B continues the same run


def test_tracker_names_and_missing_packages(tiny_data, tmp_path, monkeypatch):
    assert trackers.tracker_names("tensorboard, wandb,none") == ["tensorboard", "wandb"]
    assert trackers.tracker_names(None) == []
    with pytest.raises(ConfigError, match="unknown tracker.*'tensorbord'"):
        TrainerConfig(report_to="tensorbord")
    monkeypatch.setitem(trackers.AVAILABLE, "wandb", lambda: False)
    monkeypatch.setitem(trackers.AVAILABLE, "tensorboard", lambda: False)
    with pytest.raises(ConfigError, match=r'tensorboard is not installed; pip install -e "\.\[tracking\]"'):
        trackers.check_trackers("tensorboard", str(tmp_path))
    monkeypatch.setitem(trackers.AVAILABLE, "mlflow", lambda: True)
    with pytest.raises(ConfigError, match="needs an output_dir"):
        trackers.check_trackers("mlflow", None)
    task = ImageClassifier(num_classes=tiny_data.num_classes, backbone=BACKBONE, pretrained=False)
    with pytest.raises(ConfigError, match="wandb is not installed; pip install wandb"):
        tiny_trainer(output_dir=str(tmp_path / "run"), report_to="wandb").finetune(task, tiny_data)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_report_to_all_is_every_installed_tracker(tmp_path, monkeypatch):
    installed = {"tensorboard": True, "wandb": False, "mlflow": True, "comet_ml": False, "aim": False}
    for name, present in installed.items():
        monkeypatch.setitem(trackers.AVAILABLE, name, lambda present=present: present)
    assert trackers.check_trackers("all", str(tmp_path)) == ["tensorboard", "mlflow"]
    for name in installed:
        monkeypatch.setitem(trackers.AVAILABLE, name, lambda: False)
    with pytest.raises(ConfigError, match="report_to=all but no tracker is installed"):
        trackers.check_trackers("all", str(tmp_path))
