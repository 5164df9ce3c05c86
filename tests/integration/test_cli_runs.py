"""The command line end to end: train then predict, the example config, the demo as shipped."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_image_folder
from test_cli import ENV, cli

from dist_finetune.config import load_yaml


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "run.yaml"


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
    assert rows[0] == ["path", "label", "probability", "error"] and len(rows) == 13
    assert all(row[1] in ("blue", "green", "red") and 0 < float(row[2]) <= 1 and row[3] == "" for row in rows[1:])
    one = next(iter((image_folders / "val" / "red").iterdir()))
    cli("predict", "--checkpoint", str(out / "model.safetensors"), str(one), "--output", str(tmp_path / "p.csv"))
    assert list(csv.reader(open(tmp_path / "p.csv")))[1][0] == str(one)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """``examples/run.yaml`` as shipped (unfreeze_milestones, bf16, warmup 1 epoch, lr 1e-3), with only the
    data, the model size and the length overridden, on a train folder holding three unreadable files."""
    root = tmp_path_factory.mktemp("example")
    train = write_image_folder(root / "train", per_class=8, size=40, seed=1)
    write_image_folder(root / "val", per_class=4, size=40, seed=2)
    bad = {train / "red" / "empty.png": b"", train / "green" / "notes.jpg": b"not a picture",
           train / "blue" / "cut.png": (train / "blue" / "blue_0.png").read_bytes()[:60]}
    for path, content in bad.items():
        path.write_bytes(content)
    out = root / "out"
    result = cli("train", "--config", str(EXAMPLE), "--train-folder", str(train), "--val-folder", str(root / "val"),
                 "--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
                 "--max-epochs", "3", "--milestones", "1", "2", "--num-workers", "0", "--output-dir", str(out),
                 "--no-progress-bar", "--skip-bad-images", env={"XDG_CACHE_HOME": str(root / "cache")})
    return out, result, sorted(str(path) for path in bad)


def test_example_config_runs(example_run):
    out, result, _ = example_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [len(r["lr"]) for r in records] == [1, 2, 3]  # the YAML's unfreeze_milestones (2 layers, then the rest)
    # the YAML's lr 1e-2, 1 warmup epoch (6 of 18 steps) and cosine: the head's lr at each epoch end is 1e-2 x
    # 1 (warmup just done), x (1 + cos(pi * 6/12)) / 2 = 0.5, x 0 (without the warmup: 0.75, 0.25, 0)
    assert [r["lr"][0] for r in records] == pytest.approx([1e-2, 5e-3, 0.0], abs=1e-12)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000012", "step-00000018"]  # keep_last 2
    assert (out / "model.safetensors").is_file() and (out / "last.safetensors").is_file()


def test_skip_bad_images_from_the_command_line(example_run):
    out, result, bad = example_run
    printed = result.stdout
    assert "skipping 3 unreadable image(s)" in printed and all(path in printed for path in bad)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train_images"] == 24  # the 24 good images, none of the 3 bad ones


def check_demo_output(result, output_dir: Path, epochs: int) -> None:
    """What README's Quickstart says the demo does: a generated 4-class dataset in OUTPUT_DIR/data, resnet18
    from random initialisation (no cached weights: it says so), freeze_unfreeze at 64 px, the model saved,
    held-out images labelled, and where its curves and report are."""
    data = output_dir / "data"
    assert sorted(p.name for p in (data / "train").iterdir()) == ["checker", "dots", "horizontal", "vertical"]
    assert "randomly initialised (no cached pretrained weights, offline) resnet18" in result.stdout, result.stdout
    recorded = load_yaml(output_dir / "config.yaml")  # the run's own record of its settings
    assert (recorded.data.train_folder, recorded.data.val_folder) == (str(data / "train"), str(data / "val"))
    assert (recorded.model.backbone, recorded.model.pretrained) == ("resnet18", False)
    assert (recorded.strategy.name, recorded.data.image_size, recorded.trainer.max_epochs) == \
        ("freeze_unfreeze", 64, epochs)
    assert (output_dir / "model.safetensors").is_file()
    assert "predictions on held-out images" in result.stdout
    predictions = result.stdout.split("predictions on held-out images", 1)[1].split("final val_acc", 1)[0]
    assert predictions.count(" -> ") == 8, result.stdout  # 2 held-out images per class
    for name in ("curves.png", "confusion_matrix.png", "report.json"):
        assert (output_dir / name).is_file() and str(output_dir / name) in result.stdout


def demo(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed ``dist-finetune`` console script, running this checkout's package, with an empty
    torch cache (no pretrained weights on this machine) and no network."""
    script = shutil.which("dist-finetune")
    assert script is not None, "the dist-finetune console script is not installed (pip install -e .)"
    root = str(Path(__file__).resolve().parents[2])
    env = {**ENV, "PYTHONPATH": os.pathsep.join([root, ENV.get("PYTHONPATH", "")]),
           "TORCH_HOME": str(output_dir / "torch_cache")}
    result = subprocess.run([script, "demo", "--output-dir", str(output_dir), *args], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_demo_as_shipped_learns(tmp_path):
    """The demo with its defaults, as the README's first command runs it through the installed console script:
    every step of its pipeline (data, finetune through the unfreeze, save, predict, report, curves), its 8
    epochs, and what README says it reaches (about 0.8)."""
    result = demo(tmp_path)
    check_demo_output(result, tmp_path, epochs=8)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(8))
    assert records[-1]["val_acc"] >= 0.7, result.stdout  # chance is 0.25
