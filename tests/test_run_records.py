"""config.yaml (runs again), run_info.json, and `train --dry-run` (the plan, nothing trained or written)."""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import socket
import sys

import pytest
import torch
from conftest import BACKBONE

from dist_finetune.cli import build_parser, main, train_config
from dist_finetune.config import load_yaml
from dist_finetune.run_files import read_jsonl


def train_args(image_folders, out, *extra) -> list[str]:
    return ["train", "--train-folder", str(image_folders / "train"), "--val-folder", str(image_folders / "val"),
            "--backbone", BACKBONE, "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
            "--max-epochs", "2", "--gradient-accumulation-steps", "2", "--log-every-n-steps", "1",
            "--strategy", "no_freeze", "--no-progress-bar", "--output-dir", str(out), *extra]


def test_dry_run_plans_what_train_then_does(image_folders, tmp_path, capsys):
    out = tmp_path / "run"
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    args = train_args(image_folders, out, "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "1",
                      "--initial-denom-lr", "20", "--report-to", "tensorboard")
    main([*args, "--dry-run"])
    plan = capsys.readouterr().out
    assert not out.exists()  # nothing trained, nothing written
    assert "CPU run: malloc " in plan  # the allocator setting is announced (tests/test_host_memory.py: its effect)
    for line in ("train: 24 images from", "blue 8, green 8, red 8", "val: 12 images from", "blue 4, green 4, red 4",
                 "effective batch 8 = batch 4 x 1 process(es) x 2 accumulation step(s)",
                 "3 steps per epoch x 2 epochs = 6 optimizer steps",
                 "epoch 1: conv1+bn1, layer1, layer2, layer3, layer4 joined training",
                 "(1 param group(s), target lr 5.00e-04)", "starts fresh",
                 f"trackers: tensorboard (TensorBoard: tensorboard --logdir {out})"):
        assert line in plan, line
    assert "never unfreeze" not in plan

    main(args)  # the run the plan described
    assert [s["step"] for s in read_jsonl(out / "steps.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r.get("joined") for r in read_jsonl(out / "metrics.jsonl")][1][0] == "conv1+bn1"

    # config.yaml is the resolved config, and runs again
    config = load_yaml(out / "config.yaml")
    assert config == train_config(build_parser().parse_args(args))
    assert config.trainer.gradient_accumulation_steps == 2 and config.trainer.report_to == "tensorboard"
    assert config.strategy.initial_denom_lr == 20
    info = json.loads((out / "run_info.json").read_text())
    assert {"torch", "accelerate", "datasets", "timm", "dist_finetune"} <= set(info["versions"])
    assert info["versions"]["dist_finetune"] and info["world_size"] == 1 and info["device"] == "cpu"
    assert info["mixed_precision"] == "no" and info["resumed_from"] is None
    assert {"torchvision"} <= set(info["versions"]) and info["host"] == socket.gethostname()
    assert info["command"] == sys.argv  # this process's command line (main() ran in it)
    assert started <= datetime.datetime.fromisoformat(info["started"]) <= datetime.datetime.now(datetime.timezone.utc)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "steps.jsonl", "run_info.json")}
    main([*args, "--resume", "latest", "--dry-run"])
    assert f"resumes from {out / 'checkpoints' / 'step-00000006'} at epoch 2, step 6" in capsys.readouterr().out
    assert before == {name: (out / name).read_bytes() for name in before}  # the run's files untouched
    with pytest.warns(UserWarning, match="nothing is left to train"):
        main([*args, "--resume", "latest"])  # a real resume (of a finished run) writes run_info.json again
    resumed = json.loads((out / "run_info.json").read_text())
    assert resumed["resumed_from"] == str(out / "checkpoints" / "step-00000006")
    assert resumed["started"] >= info["started"]
    again = tmp_path / "again"
    main(["train", "--config", str(out / "config.yaml"), "--output-dir", str(again), "--dry-run"])
    assert "3 steps per epoch x 2 epochs" in capsys.readouterr().out and not again.exists()


def test_dry_run_warns_about_layers_that_never_unfreeze(image_folders, tmp_path, capsys):
    main([*train_args(image_folders, tmp_path / "run", "--strategy", "unfreeze_milestones", "--milestones", "1", "5",
                      "--num-layers", "2", "--no-tune-cpu-allocator"), "--dry-run"])
    plan = capsys.readouterr().out
    assert "CPU run: malloc" not in plan
    assert "epoch 1: layer3, layer4 joined training" in plan
    assert "warning: 3 backbone layer(s) never unfreeze in 2 epochs: conv1+bn1, layer1, layer2" in plan


@pytest.mark.parametrize("change, message", [
    (("--train-folder", "/nonexistent/train"), "train folder /nonexistent/train does not exist"),
    (("--backbone", "no_such_backbone"), "no_such_backbone"),
    (("--batch-size", "32"), "24 training images but one step needs batch_size 32"),
    (("--lr", "-1"), "lr must be positive"),
    (("--report-to", "tensorbord"), "unknown tracker"),
    (("bad image",), "cannot read image"),
])
def test_dry_run_fails_like_train(image_folders, tmp_path, capsys, change, message):
    args = train_args(image_folders, tmp_path / "run", "--dry-run")
    if change == ("bad image",):
        folder = tmp_path / "images"
        shutil.copytree(image_folders, folder)
        (folder / "train" / "red" / "red_0.png").write_bytes(b"not an image")
        args = train_args(folder, tmp_path / "run", "--dry-run")
    elif change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_crash_while_a_resume_rewrites_the_logs_leaves_the_old_files_whole(image_folders, tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl and steps.jsonl (dropping lines past its checkpoint); a writer
    that dies halfway through (disk full, a kill) must leave each old file as it was."""
    out = tmp_path / "run"
    main(train_args(image_folders, out))
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "steps.jsonl")}
    assert all(before.values())
    untouched = {name: getattr(pathlib.Path, name) for name in ("write_text", "write_bytes")}

    def torn(name):
        def write(self, data, *args, **kwargs):
            if ".jsonl" not in self.name:
                return untouched[name](self, data, *args, **kwargs)
            raw = data.encode() if isinstance(data, str) else data
            with open(self, "wb") as handle:
                handle.write(raw[: len(raw) // 2])
            raise OSError(f"simulated crash halfway through writing {self.name}")
        return write

    for name in untouched:
        monkeypatch.setattr(pathlib.Path, name, torn(name))
    with pytest.raises(OSError, match="simulated crash halfway"):
        main([*train_args(image_folders, out), "--resume", "latest"])
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_python_dry_run_returns_the_plan_and_trains_nothing(tiny_data):
    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier
    from dist_finetune.run_records import dry_run

    task = ImageClassifier(3, "tiny_resnet", pretrained=False)
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    plan = dry_run(tiny_trainer(max_epochs=2), task, tiny_data, "freeze")
    assert plan.startswith("dry run: everything checked; nothing trained or written\ndata\n")
    assert "6 steps per epoch x 2 epochs = 12 optimizer steps" in plan
    assert all(torch.equal(before[name], tensor) for name, tensor in task.state_dict().items())


def test_config_yaml_records_resume_and_the_checkpoint_a_resumed_run_started_from(image_folders, tmp_path):
    """``--resume`` is a config field: a fresh run's config.yaml says it did not resume; a resumed one's names
    the checkpoint it continued (3 optimizer steps an epoch: 24 images, batch 4, 2 accumulation steps)."""
    out = tmp_path / "run"
    main(train_args(image_folders, out, "--max-epochs", "1"))
    assert load_yaml(out / "config.yaml").trainer.resume is None
    main(train_args(image_folders, out, "--resume", "latest"))
    assert load_yaml(out / "config.yaml").trainer.resume == str(out / "checkpoints" / "step-00000003")
