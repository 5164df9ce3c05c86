"""The command line: parsing (YAML + flags, --help documenting every flag), the compile flags, and errors as
one clear line. Whole runs (train then predict, the example config, the demo): integration/test_cli_runs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dist_finetune.cli import TRAIN_FLAGS, build_parser, main, train_config
from dist_finetune.config import TrainerConfig, load_yaml
from dist_finetune.errors import ConfigError

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
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
--early-stopping-min-delta --log-every-n-steps --deterministic --augment --mixup --cutmix --tta --ema-decay
--lora-rank --lora-alpha --lora-targets --lora-dropout
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


def test_demo_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["demo"])
    assert (args.output_dir, args.max_epochs) == ("demo_output", 8)


def test_only_user_errors_become_one_line_internal_errors_keep_their_traceback(monkeypatch, capsys):
    from dist_finetune import cli, recipe

    def broken(config, **options):
        raise ValueError("an internal bug")

    monkeypatch.setattr(recipe, "finetune_from_config", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["train", "--train-folder", "x"])

    def user_error(config, **options):
        raise ConfigError("fix the setting")

    monkeypatch.setattr(recipe, "finetune_from_config", user_error)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--train-folder", "x"])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == "dist-finetune train: error: fix the setting"


def test_compile_flags_and_validation():
    args = build_parser().parse_args(["train", "--compile", "--compile-backend", "aot_eager",
                                      "--compile-mode", "max-autotune", "--check-every-n-steps", "50"])
    trainer = train_config(args).trainer
    assert (trainer.compile, trainer.compile_backend, trainer.compile_mode) == (True, "aot_eager", "max-autotune")
    assert trainer.check_every_n_steps == 50
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        TrainerConfig(compile_mode="fastest")
    with pytest.raises(ConfigError, match="check_every_n_steps must be >= 1"):
        TrainerConfig(check_every_n_steps=0)
