"""The loop's own choices, seen from outside: the rank check's points and its off switch, what runs compiled
(and a launch config's compile request taken over), and the CPU allocator setting."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer

from dist_finetune import ImageClassifier, Trainer
from dist_finetune import trainer as trainer_module


def finetune(tiny_data, **settings):
    trainer = tiny_trainer(max_epochs=2, **settings)
    trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, ("freeze_unfreeze", 1))
    return trainer


@pytest.mark.parametrize("check, expected", [
    (True, ["after the strategy transition at epoch 1", "at the end of training"]),
    (False, []),
])
def test_the_rank_check_runs_after_each_transition_and_at_the_end_unless_turned_off(tiny_data, monkeypatch, check,
                                                                                     expected):
    checked = []
    monkeypatch.setattr(trainer_module, "check_rank_consistency", lambda accelerator, model, optimizer, where:
                        checked.append(where))
    finetune(tiny_data, check_rank_consistency=check)
    assert checked == expected


def test_a_launch_config_compile_request_compiles_training_only(tiny_data, monkeypatch):
    """ACCELERATE_DYNAMO_BACKEND (accelerate launch --dynamo_backend) with compile=False: the trainer compiles
    the training forward itself with that backend; validation runs the uncompiled model."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    compiled, calls = [], []

    def fake_compile(model, backend=None, mode=None):
        compiled.append((backend, mode))
        return lambda images: calls.append(len(images)) or model(images)

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = finetune(tiny_data)
    assert compiled and set(compiled) == {("aot_eager", None)}
    assert calls == [4] * 12  # 2 epochs x 6 training batches of 4; none of validation's 12 images
    assert [record["val_images"] for record in trainer.metrics] == [12, 12]


@pytest.mark.parametrize("tune, expected", [(True, 1), (False, 0)])
def test_cpu_runs_keep_freed_memory_unless_turned_off(monkeypatch, tune, expected):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or "kept")
    Trainer(max_epochs=1, tune_cpu_allocator=tune)._make_accelerator()
    assert len(calls) == expected
