"""The command line end to end: train (YAML + flags), predict (stdout and CSV), demo, --help."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder

from dist_finetune.cli import TRAIN_FLAGS, build_parser, main, train_config
from dist_finetune.config import load_yaml

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run.yaml"
# the flags the README documents (its "Command line" section and the train flags of the config
# sections), written out here: taking them from the code's own list would pass if one disappeared
DOCUMENTED_TRAIN_FLAGS = """
--config --resume --train-folder --val-folder --val-split --image-size --batch-size --num-workers --no-augment
--skip-bad-images --backbone --no-pretrained --weights --head-hidden --head-dropout --strategy --unfreeze-epoch
--milestones --num-layers --train-bn --no-train-bn --max-epochs --lr --optimizer --weight-decay --scheduler
--warmup-epochs --label-smoothing --mixed-precision --gradient-accumulation-steps --max-grad-norm --seed
--output-dir --no-feature-cache --save-every-n-steps --keep-last --no-rank-check --channels-last
--no-channels-last --compile --compile-backend --compile-mode --check-every-n-steps --no-progress-bar
--unfreeze-warmup-epochs --layer-decay --metric-for-best --keep-last-model --early-stopping-patience
--early-stopping-min-delta --log-every-n-steps --deterministic
""".split()


def cli(*args, check=True, env=None):
    result = subprocess.run([sys.executable, "-m", "dist_finetune", *args], capture_output=True, text=True,
                            env={**ENV, **(env or {})}, timeout=600)
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


def test_deterministic_flag_reaches_the_config_and_config_yaml(tmp_path):
    from dist_finetune.run_records import config_yaml

    assert train_config(build_parser().parse_args(["train"])).trainer.deterministic is False
    config = train_config(build_parser().parse_args(["train", "--deterministic"]))
    assert config.trainer.deterministic is True
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(config))  # what a run writes as OUTPUT_DIR/config.yaml
    assert "  deterministic: true\n" in path.read_text() and load_yaml(path).trainer.deterministic is True


def help_flags(capsys, *command) -> set[str]:
    """The options ``dist-finetune COMMAND --help`` lists (each with its help text)."""
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


def test_help_documents_every_flag(capsys):
    listed = help_flags(capsys, "train")
    assert set(DOCUMENTED_TRAIN_FLAGS) <= listed, sorted(set(DOCUMENTED_TRAIN_FLAGS) - listed)
    assert {flag for flag, _, _ in TRAIN_FLAGS} <= listed  # flags added since are documented too
    assert {"--checkpoint", "--output", "--batch-size"} <= help_flags(capsys, "predict")
    assert {"--output-dir", "--max-epochs"} <= help_flags(capsys, "demo")


def test_a_config_field_with_help_is_a_train_flag_that_prints_its_default(capsys):
    """The flag, its type and its help come from the field (``config.setting``); the default is printed from
    the field's; a field without help has no flag."""
    from dataclasses import dataclass, fields
    from typing import get_type_hints

    from dist_finetune.cli import config_flag
    from dist_finetune.config import setting

    @dataclass
    class Section:
        warmup_images: int | None = setting(64, "images before the first step")
        fast: bool = setting(False, "go fast")
        careful: bool = setting(True, "skip the checks")
        pair: tuple[int, int] = setting((1, 2), "two epochs", metavar=("A", "B"))
        mode: str = setting("a", "the mode", choices=("a", "b"), flag="--how")
        hidden: int = 3

    hints = get_type_hints(Section)
    assert [config_flag("extra", spec, hints[spec.name]) for spec in fields(Section) if spec.metadata] == [
        ("--warmup-images", "extra.warmup_images", {"type": int, "help": "images before the first step (default: 64)"}),
        ("--fast", "extra.fast", {"action": "store_true", "help": "go fast"}),
        ("--no-careful", "extra.careful", {"action": "store_false", "help": "skip the checks"}),
        ("--pair", "extra.pair",
         {"metavar": ("A", "B"), "type": int, "nargs": 2, "help": "two epochs (default: 1 2)"}),
        ("--how", "extra.mode", {"choices": ("a", "b"), "help": "the mode (default: a)"}),
    ]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("square input size in pixels (default: 224)", "--milestones A B unfreeze_milestones: last K layers "
                  "join at A, the rest at B (default: 2 5)", "go (default: outputs)", "(default: on)"):
        assert shown in text, shown
    assert train_config(build_parser().parse_args(["train", "--resume", "latest"])).trainer.resume == "latest"


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


def test_user_errors_are_one_clear_line(tmp_path, capsys):
    result = cli("train", "--train-folder", str(tmp_path / "nowhere"), "--no-pretrained", check=False)
    assert result.returncode == 2 and "train folder" in result.stderr and "Traceback" not in result.stderr
    for args, message in (
        (["train", "--train-folder", str(tmp_path), "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "-1",
          "--max-epochs", "3"], "unfreeze_epoch must be >= 0"),
        (["predict", "--checkpoint", str(tmp_path / "none.safetensors"), "x.jpg"], "does not exist"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        error = capsys.readouterr().err
        assert exited.value.code == 2 and message in error and len(error.splitlines()) == 1, error


def test_processes_that_cannot_form_the_launched_world_are_refused(image_folders, tmp_path):
    """A stray WORLD_SIZE=2 without a launcher's rendezvous variables: one line naming the fix, not a
    traceback, and never a run that trains alone believing it is one of two ranks."""
    result = cli("train", "--train-folder", str(image_folders / "train"), "--backbone", "timm:test_resnet",
                 "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--max-epochs", "1",
                 "--output-dir", str(tmp_path / "out"), env={"WORLD_SIZE": "2"}, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("dist-finetune train: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr
    assert "WORLD_SIZE=2 is set but MASTER_ADDR is not" in error[0] and "accelerate launch" in error[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


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
    root = str(Path(__file__).resolve().parents[1])
    env = {**ENV, "PYTHONPATH": os.pathsep.join([root, ENV.get("PYTHONPATH", "")]),
           "TORCH_HOME": str(output_dir / "torch_cache")}
    result = subprocess.run([script, "demo", "--output-dir", str(output_dir), *args], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["demo"])
    assert (args.output_dir, args.max_epochs) == ("demo_output", 8)


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
