"""FSDP2 as one process sees it (dist_finetune/fsdp.py): what cannot shard is refused before any training,
the sharding setting and flags, the GPU path (launch config -> FSDP2, bf16 policy) on a faked CUDA device.
Two real gloo ranks training sharded: integration/test_fsdp_ranks.py."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from dist_finetune import ImageClassifier
from dist_finetune.errors import ConfigError, DistributedSetupError


# ------------------------------------------------------------------ bad input, before any training


def test_freezing_under_fsdp1_or_deepspeed_is_refused_naming_fsdp2(monkeypatch, tiny_data):
    from conftest import tiny_trainer

    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(DistributedSetupError, match=r"not supported under FSDP1 .*Set `fsdp_version: 2` .*fsdp2\.yaml"):
        trainer.finetune(task, tiny_data, strategy="freeze_unfreeze")
    assert trainer.accelerator is None, "refused before an Accelerator was made"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(DistributedSetupError, match=r"not supported under DeepSpeed.*Shard with FSDP2 instead.*"
                                                    r"launch_configs/fsdp2\.yaml.*--sharding fsdp2"):
        trainer.finetune(task, tiny_data, strategy="unfreeze_milestones")


def test_a_backbone_whose_layers_cannot_be_shard_units_is_refused(tiny_data):
    """A layer named by parameters of a module another layer shares (bn1's weight in one layer, its bias with
    the rest of the stem in another) has no module of its own: refused naming the layer and the fix, before
    training; so are two layers sharing a module."""
    from conftest import tiny_trainer

    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    task.layer_names = [["bn1.weight"], ["conv1", "bn1.bias", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    trainer = tiny_trainer(max_epochs=1, sharding="fsdp2")
    before = {n: p.clone() for n, p in task.named_parameters()}
    with pytest.raises(ConfigError, match=r"layer 0 \(bn1\.weight\) has no module of its own.*layer_names that "
                                          r"name whole modules.*sharding 'ddp'"):
        trainer.finetune(task, tiny_data, strategy="freeze_unfreeze")
    assert all(torch.equal(before[n], p) for n, p in task.named_parameters())
    task.layer_names = [["conv1", "bn1"], ["layer1", "layer2"], ["layer2"], ["layer3"], ["layer4"]]
    with pytest.raises(ConfigError, match="layers 1 and 2 share parameters"):
        trainer.finetune(task, tiny_data, strategy="freeze_unfreeze")


def test_torch_without_fully_shard_and_fp16_are_refused(monkeypatch):
    import builtins

    from dist_finetune.fsdp import mixed_precision_policy, resolve_sharding

    real_import = builtins.__import__

    def without_fully_shard(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch.distributed.fsdp" and "fully_shard" in (fromlist or ()):
            raise ImportError("cannot import name 'fully_shard'")
        return real_import(name, globals, locals, fromlist, level)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "__import__", without_fully_shard)
        with pytest.raises(ConfigError, match=r"needs torch\.distributed\.fsdp\.fully_shard \(torch >= 2\.6\).*upgrade"):
            resolve_sharding("fsdp2", freezes=True)
    with pytest.raises(ConfigError, match="fp16 needs a sharded gradient scaler.*--mixed-precision bf16"):
        mixed_precision_policy("fp16")


def test_sharding_setting_and_flags():
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.config import TrainerConfig

    args = build_parser().parse_args(["train", "--sharding", "fsdp2", "--activation-checkpointing"])
    trainer = train_config(args).trainer
    assert (trainer.sharding, trainer.activation_checkpointing) == ("fsdp2", True)
    assert (TrainerConfig().sharding, TrainerConfig().activation_checkpointing) == (None, False)
    with pytest.raises(ConfigError, match="sharding must be one of"):
        TrainerConfig(sharding="fsdp1")


# ------------------------------------------------------------------ the GPU path on a faked CUDA device


def test_launch_config_fsdp2_on_gpus_shards_every_layer_with_a_bf16_policy(monkeypatch):
    """What `accelerate launch --config_file fsdp2.yaml` on 8 GPUs does (faked: no GPU here): sharding
    'fsdp2' is chosen, the mesh is a CUDA mesh of 8, every backbone layer (tiny_resnet: stem, layer1..4)
    and then the task are fully_shard-ed with bf16 parameters and fp32 gradient reduction."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp_module

    from dist_finetune.fsdp import resolve_sharding, shard_for_training

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_sharding(None, freezes=True) == "fsdp2"
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda kind, shape: calls.append(("mesh", kind, shape)))
    monkeypatch.setattr(fsdp_module, "fully_shard", lambda modules, **options: calls.append((modules, options)))
    task = ImageClassifier(3, backbone="tiny_resnet", pretrained=False)
    gpu = SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="bf16", num_processes=8)
    assert shard_for_training(task, gpu) is True
    assert calls[0] == ("mesh", "cuda", (8,))
    units = [modules for modules, _ in calls[1:]]
    assert units == [[task.backbone.conv1, task.backbone.bn1], [task.backbone.layer1], [task.backbone.layer2],
                     [task.backbone.layer3], [task.backbone.layer4], task]
    for _, options in calls[1:]:
        policy = options["mp_policy"]
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        assert options["reshard_after_forward"] is True


def test_the_launchers_fsdp_request_is_hidden_while_the_accelerator_is_built_then_restored_as_spelled(monkeypatch):
    from dist_finetune.fsdp import runner_applies_fsdp2

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with runner_applies_fsdp2():
        assert os.environ["ACCELERATE_USE_FSDP"] == "false"
    assert os.environ["ACCELERATE_USE_FSDP"] == "1"
