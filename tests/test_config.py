"""Configuration: YAML sections, overrides, and validation before any work starts."""

from __future__ import annotations

import pytest

from dist_finetune.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_yaml


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 8\nstrategy:\n  name: unfreeze_milestones\n  milestones: [1, 3]\n"
                    "trainer:\n  max_epochs: 5\n  lr: 0.01\n")
    config = load_yaml(path)
    assert config.data.batch_size == 8 and config.strategy.milestones == (1, 3) and config.trainer.lr == 0.01
    config = apply_overrides(config, {"trainer.lr": 0.5, "data.batch_size": 2})
    assert config.trainer.lr == 0.5 and config.data.batch_size == 2 and config.trainer.max_epochs == 5


@pytest.mark.parametrize("raw, message", [
    ({"trainer": {"lrr": 1}}, "unknown key"),
    ({"optimiser": {}}, "unknown section"),
    ({"strategy": {"name": "thaw"}}, "unknown strategy"),
    ({"trainer": {"lr": -1}}, "lr must be positive"),
    ({"strategy": {"name": "unfreeze_milestones", "milestones": [3, 2]}}, "increasing"),
    ({"strategy": {"name": "freeze_unfreeze", "unfreeze_epoch": -1}}, "unfreeze_epoch must be >= 0"),
    ({"strategy": {"name": "unfreeze_milestones", "milestones": [-1, 2]}}, "increasing"),
    ({"trainer": {"metric_for_best": "val_f1"}}, "metric_for_best must be one of"),
    ({"trainer": {"layer_decay": 1.5}}, "layer_decay must be in"),
    ({"trainer": {"mixed_precision": "fp8"}}, "mixed_precision"),
    ({"data": {"batch_size": 0}}, "batch_size"),
    ({"strategy": {"initial_denom_lr": 0}}, "initial_denom_lr"),
])
def test_invalid_configs_are_rejected(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_schedules_past_the_last_epoch_are_valid_configs():
    """As in Flash, an unfreeze at or past max_epochs is allowed (the run warns and trains frozen)."""
    config = config_from_dict({"strategy": {"name": "freeze_unfreeze", "unfreeze_epoch": 10},
                               "trainer": {"max_epochs": 10}})
    strategy = config.strategy.strategy()
    assert (type(strategy).__name__, strategy.unfreeze_epoch) == ("FreezeUnfreeze", 10)
    config = config_from_dict({"strategy": {"name": "unfreeze_milestones", "milestones": [1, 12]}})
    strategy = config.strategy.strategy()
    assert (strategy.unfreeze_milestones, strategy.num_layers) == ((1, 12), 1)  # the default layer count


def test_strategy_defaults_are_defined_once():
    """The CLI/YAML defaults are the Python API's: the same strategy objects come out of both."""
    from dist_finetune.config import StrategyConfig
    from dist_finetune.finetuning import FreezeUnfreeze, UnfreezeMilestones, resolve_strategy

    defaults = {  # README: unfreeze at epoch 3; milestones (2, 5) with 1 layer; train_bn=False; new groups at lr / 100
        "freeze_unfreeze": {"name": "FreezeUnfreeze", "attr_names": ["backbone"], "train_bn": False,
                            "unfreeze_epoch": 3, "initial_denom_lr": 100.0},
        "unfreeze_milestones": {"name": "UnfreezeMilestones", "attr_names": ["backbone"], "train_bn": False,
                                "unfreeze_milestones": (2, 5), "num_layers": 1, "initial_denom_lr": 100.0},
    }
    for name, cls in (("freeze_unfreeze", FreezeUnfreeze), ("unfreeze_milestones", UnfreezeMilestones)):
        section = StrategyConfig(name=name)
        assert section.strategy().describe() == resolve_strategy(name).describe() == cls().describe() == defaults[name]
    changed = StrategyConfig(name="freeze_unfreeze", initial_denom_lr=7, train_bn=True).strategy()
    assert (changed.initial_denom_lr, changed.train_bn) == (7.0, True)  # not the defaults: the settings are used


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(RunConfig(), {"trainer.nope": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def documented_trainer_defaults(config) -> dict:
    names = ("max_epochs", "lr", "optimizer", "scheduler", "unfreeze_warmup_epochs", "layer_decay", "keep_last",
             "metric_for_best", "load_best_model_at_end", "early_stopping_patience", "check_rank_consistency",
             "channels_last", "compile", "check_every_n_steps", "deterministic")
    return {name: getattr(config, name) for name in names}


# README, "Trainer" and "Defaults": the values written out, not read from TrainerConfig
README_TRAINER_DEFAULTS = {
    "max_epochs": 10, "lr": 1e-2, "optimizer": "adamw", "scheduler": "cosine", "unfreeze_warmup_epochs": 2,
    "layer_decay": None, "keep_last": 2, "metric_for_best": "val_acc", "load_best_model_at_end": True,
    "early_stopping_patience": None, "check_rank_consistency": True, "channels_last": None, "compile": False,
    "check_every_n_steps": 10, "deterministic": False,
}


def test_trainer_defaults_are_the_documented_ones():
    from dist_finetune import Trainer
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.config import TrainerConfig

    assert documented_trainer_defaults(TrainerConfig()) == README_TRAINER_DEFAULTS
    assert documented_trainer_defaults(Trainer().config) == README_TRAINER_DEFAULTS
    from_cli = train_config(build_parser().parse_args(["train"])).trainer
    assert documented_trainer_defaults(from_cli) == README_TRAINER_DEFAULTS


def test_strategy_defaults_are_the_documented_numbers():
    """README: unfreeze at epoch 3; milestones (2, 5) with 1 layer; train_bn=False; freeze_unfreeze for a run."""
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.config import StrategyConfig
    from dist_finetune.finetuning import FreezeUnfreeze, UnfreezeMilestones, resolve_strategy

    from_cli = train_config(build_parser().parse_args(["train"])).strategy
    assert from_cli.name == StrategyConfig().name == "freeze_unfreeze"
    for unfreeze in (FreezeUnfreeze(), resolve_strategy("freeze_unfreeze"), StrategyConfig().strategy(),
                     from_cli.strategy()):
        assert (type(unfreeze).__name__, unfreeze.unfreeze_epoch, unfreeze.train_bn) == ("FreezeUnfreeze", 3, False)
    milestones_cli = train_config(build_parser().parse_args(["train", "--strategy", "unfreeze_milestones"])).strategy
    for milestones in (UnfreezeMilestones(), resolve_strategy("unfreeze_milestones"),
                       StrategyConfig(name="unfreeze_milestones").strategy(), milestones_cli.strategy()):
        assert (milestones.unfreeze_milestones, milestones.num_layers, milestones.train_bn) == ((2, 5), 1, False)
    for name in ("no_freeze", "freeze"):
        assert resolve_strategy(name).train_bn is False


def test_val_split_defaults_to_one_fifth(tmp_path):
    """20 images per class and no val folder: 4 of each class are held out (README: val_split default 0.2)."""
    from conftest import write_image_folder

    from dist_finetune import ImageClassificationData
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.config import DataConfig

    assert DataConfig().val_split == 0.2
    assert train_config(build_parser().parse_args(["train"])).data.val_split == 0.2
    write_image_folder(tmp_path / "train", per_class=20, size=16)
    data = ImageClassificationData.from_folders(str(tmp_path / "train"), image_size=16, batch_size=4, num_workers=0)
    assert sorted(data.val_labels) == [0] * 4 + [1] * 4 + [2] * 4 and len(data.train_paths) == 48
