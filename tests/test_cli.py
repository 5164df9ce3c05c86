"""The command line end to end: train (YAML + flags), predict (stdout and CSV), demo, --help."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from dist_finetune.cli import TRAIN_FLAGS, build_parser, train_config

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dist_finetune", *args], capture_output=True, text=True, env=ENV,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  lr: 0.01\n  max_epochs: 4\nmodel:\n  backbone: resnet34\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.1", "--no-pretrained",
                                      "--milestones", "1", "2", "--no-train-bn"])
    config = train_config(args)
    assert config.trainer.lr == 0.1 and config.trainer.max_epochs == 4 and config.model.backbone == "resnet34"
    assert config.model.pretrained is False and config.strategy.milestones == (1, 2)
    assert config.strategy.train_bn is False and config.trainer.output_dir == "outputs"


def test_help_documents_every_flag():
    text = cli("train", "--help").stdout
    for flag, _, _ in TRAIN_FLAGS:
        assert flag in text
    assert "--checkpoint" in cli("predict", "--help").stdout and "--output-dir" in cli("demo", "--help").stdout


def test_train_then_predict(image_folders, tmp_path):
    out = tmp_path / "run"
    cli("train", "--train-folder", str(image_folders / "train"), "--val-folder", str(image_folders / "val"),
        "--backbone", "timm:test_resnet", "--no-pretrained", "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "1",
        "--max-epochs", "2", "--batch-size", "4", "--image-size", "32", "--lr", "0.01", "--num-workers", "0",
        "--output-dir", str(out), "--no-progress-bar")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and len(records[1]["lr"]) == 2
    printed = cli("predict", "--checkpoint", str(out / "model.safetensors"), str(image_folders / "val")).stdout
    rows = list(csv.reader(printed.splitlines()))
    assert rows[0] == ["path", "label", "probability"] and len(rows) == 13
    assert all(row[1] in ("blue", "green", "red") and 0 < float(row[2]) <= 1 for row in rows[1:])
    one = next(iter((image_folders / "val" / "red").iterdir()))
    cli("predict", "--checkpoint", str(out / "model.safetensors"), str(one), "--output", str(tmp_path / "p.csv"))
    assert list(csv.reader(open(tmp_path / "p.csv")))[1][0] == str(one)


def test_user_errors_are_one_clear_line(tmp_path):
    result = cli("train", "--train-folder", str(tmp_path / "nowhere"), "--no-pretrained", check=False)
    assert result.returncode == 2 and "train folder" in result.stderr and "Traceback" not in result.stderr
    result = cli("train", "--train-folder", str(tmp_path), "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "-1",
                 "--max-epochs", "3", check=False)
    assert result.returncode == 2 and "unfreeze_epoch must be >= 0" in result.stderr
    result = cli("predict", "--checkpoint", str(tmp_path / "none.safetensors"), "x.jpg", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    result = cli("demo", "--output-dir", str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["val_acc"] > 0.6, result.stdout  # chance is 0.25
    assert "predictions on held-out images" in result.stdout and result.stdout.count(" -> ") == 8
