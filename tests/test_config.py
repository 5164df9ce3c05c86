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
    ({"strategy": {"name": "freeze_unfreeze", "unfreeze_epoch": 10}, "trainer": {"max_epochs": 10}},
     "past the last epoch"),
    ({"strategy": {"name": "unfreeze_milestones", "milestones": [1, 12]}}, "reach past the last epoch"),
    ({"trainer": {"mixed_precision": "fp8"}}, "mixed_precision"),
    ({"data": {"batch_size": 0}}, "batch_size"),
])
def test_invalid_configs_are_rejected(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(RunConfig(), {"trainer.nope": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
