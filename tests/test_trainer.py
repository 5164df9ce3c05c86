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


@pytest.fixture(scope="module")
def compiled_run(tiny_data):
    """freeze_unfreeze at 1 over 2 epochs with ACCELERATE_DYNAMO_BACKEND set (accelerate launch --dynamo_backend)
    and compile=False: records every torch.compile call, every call of the compiled forward, every rank check."""
    seen = {"compiled": [], "calls": [], "checked": []}

    def fake_compile(model, backend=None, mode=None):
        seen["compiled"].append((backend, mode))
        return lambda images: seen["calls"].append(len(images)) or model(images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
        patch.setattr(torch, "compile", fake_compile)
        patch.setattr(trainer_module, "check_rank_consistency", lambda accelerator, model, optimizer, where:
                      seen["checked"].append(where))
        seen["trainer"] = finetune(tiny_data)
    return seen


def test_the_rank_check_runs_after_each_transition_and_at_the_end(compiled_run):
    assert compiled_run["checked"] == ["after the strategy transition at epoch 1", "at the end of training"]


def test_the_rank_check_can_be_turned_off(tiny_data, monkeypatch):
    checked = []
    monkeypatch.setattr(trainer_module, "check_rank_consistency", lambda accelerator, model, optimizer, where:
                        checked.append(where))
    finetune(tiny_data, check_rank_consistency=False)
    assert checked == []


def test_a_launch_config_compile_request_compiles_training_only(compiled_run):
    """The trainer compiles the training forward itself with the launch config's backend; validation runs
    the uncompiled model."""
    assert compiled_run["compiled"] and set(compiled_run["compiled"]) == {("aot_eager", None)}
    assert compiled_run["calls"] == [4] * 12  # 2 epochs x 6 training batches of 4; none of validation's 12 images
    assert [record["val_images"] for record in compiled_run["trainer"].metrics] == [12, 12]


@pytest.mark.parametrize("tune, expected", [(True, 1), (False, 0)])
def test_cpu_runs_keep_freed_memory_unless_turned_off(monkeypatch, tune, expected):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or "kept")
    Trainer(max_epochs=1, tune_cpu_allocator=tune)._make_accelerator()
    assert len(calls) == expected
