"""Loading a training-state checkpoint: the fields a checkpoint holds, also from one written before some were."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from dist_finetune.callbacks import Position
from dist_finetune.training_state import load_training_state


def test_a_checkpoint_written_before_layout_settings_and_callbacks_were_recorded_loads(tmp_path):
    """state.json of the oldest format (no layout, optimizer_settings or callbacks, no RNG file for this
    rank): the fields it has are read, the missing ones are None / empty, the optimizer state is joined."""
    save_file({"head.weight": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    save_file({"0.exp_avg": torch.zeros(2, 3)}, tmp_path / "optimizer.safetensors")
    groups = [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0]}]
    (tmp_path / "state.json").write_text(json.dumps({
        "position": {"epoch": 1, "batch": 2, "global_step": 5, "samples_done": 8},
        "optimizer": {"param_groups": groups, "scalars": {"0.step": 5.0}},
        "schedule": {"step_count": 5}, "scaler": None, "signature": {"backbone": "tiny_resnet"}, "num_processes": 1,
    }))
    state = load_training_state(tmp_path, rank=0)
    assert state.position == Position(epoch=1, batch=2, global_step=5, samples_done=8)
    assert torch.equal(state.model["head.weight"], torch.ones(2, 3))
    assert state.optimizer["param_groups"] == [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]
    assert state.optimizer["state"][0]["step"] == 5.0 and state.optimizer["state"][0]["exp_avg"].shape == (2, 3)
    assert (state.schedule, state.scaler, state.num_processes) == ({"step_count": 5}, None, 1)
    assert (state.layout, state.optimizer_settings, state.callbacks, state.rng) == (None, None, {}, None)
