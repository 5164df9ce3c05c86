"""FSDP2 with every strategy (dist_finetune/fsdp.py): two real gloo ranks train sharded per backbone layer,
end where DDP ends, checkpoint the optimizer sharded and resume bit-exact; what cannot shard is refused
before any training; the GPU path (launch config -> FSDP2, bf16 policy) on a faked CUDA device."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import launch

from dist_finetune import ImageClassifier
from dist_finetune.errors import ConfigError, DistributedSetupError

WORKER = Path(__file__).with_name("fsdp_worker.py")
STRATEGIES = ["no_freeze", "freeze", "freeze_unfreeze", "unfreeze_milestones", "custom"]


@pytest.fixture(scope="module")
def strategies_run(image_folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_strategies")
    launch("strategies", image_folders, out, worker=WORKER)
    return out


def reports(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}_report.json").read_text()) for rank in (0, 1)]


def finals(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(folder / f"rank{rank}_final.safetensors") for rank in (0, 1)]


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[n].double() - second[n].double()).abs().max().item() for n in first
               if first[n].is_floating_point())


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_sharded_and_frozen_parameters_get_no_optimizer_state(strategies_run, strategy):
    """tiny_resnet's 62 parameters are DTensors on both ranks, each rank holding about half of the 175,947
    elements (rows split 2 ways; odd rows go to rank 0); at every epoch end the optimizer holds exactly the
    trainable parameters and has state (a gradient was applied) for those only; both ranks end with one model."""
    first, second = reports(strategies_run / "fsdp2" / strategy)
    assert first["sharded"] == first["parameters"] and len(first["parameters"]) == 62
    assert first["total_elements"] == 175947
    for report in (first, second):
        for epoch in report["epochs"]:
            assert epoch["local_elements"] < 0.51 * 175947
            assert epoch["optimizer_state"] == epoch["in_optimizer"] == epoch["trainable"]
            assert not set(epoch["frozen"]) & set(epoch["optimizer_state"])
    assert first["epochs"][0]["local_elements"] + second["epochs"][0]["local_elements"] == 175947
    trainable = [len(epoch["trainable"]) for epoch in first["epochs"]]
    # 62 = 20 backbone convs + 40 BatchNorm weights/biases (train_bn=True: they train while frozen) + 2 head
    assert trainable == {"no_freeze": [62] * 3, "freeze": [2] * 3, "freeze_unfreeze": [42, 62, 62],
                         "unfreeze_milestones": [42, 52, 62], "custom": [42, 62, 62]}[strategy]
    assert [e["train_loss"] for e in first["epochs"]] == [e["train_loss"] for e in second["epochs"]]
    one, two = finals(strategies_run / "fsdp2" / strategy)
    assert max_difference(one, two) == 0, "the ranks hold one model (parameters and BatchNorm buffers)"


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["freeze_unfreeze", "unfreeze_milestones"])
def test_fsdp2_ends_with_the_weights_ddp_ends_with(strategies_run, strategy):
    """Same seeds, same samples, 2 ranks: FSDP2's reduce-scatter averages the gradients DDP all-reduces;
    measured: bit-identical on gloo (max difference 0.0); float reordering would be ~1e-7, bounded at 1e-5."""
    sharded, replicated = finals(strategies_run / "fsdp2" / strategy)[0], finals(strategies_run / "ddp" / strategy)[0]
    assert max_difference(sharded, replicated) < 1e-5
    start = load_file(strategies_run / "fsdp2" / strategy / "moments_epoch0.safetensors")
    assert "backbone.layer4.1.conv2.weight.exp_avg" not in start, "frozen in epoch 0: no optimizer state"
    assert reports(strategies_run / "ddp" / strategy)[0]["sharded"] == []


@pytest.mark.distributed
def test_activation_checkpointing_under_fsdp2_trains_the_same_model(strategies_run):
    """freeze_unfreeze under FSDP2 with every trainable layer recomputed in backward (the layer's parameters
    gathered again by the backward all-gather): the same losses and the same final weights, bit for bit."""
    plain, recomputed = strategies_run / "fsdp2" / "freeze_unfreeze", strategies_run / "fsdp2" / "recomputed"
    assert [e["train_loss"] for e in reports(recomputed)[0]["epochs"]] == \
        [e["train_loss"] for e in reports(plain)[0]["epochs"]]
    assert max_difference(finals(recomputed)[0], finals(plain)[0]) == 0


@pytest.mark.distributed
def test_checkpoints_hold_whole_model_files_and_a_sharded_optimizer_and_resume_bit_exact(strategies_run):
    """model.safetensors / last.safetensors hold whole tensors (loadable in one process); the training state's
    optimizer is a torch distributed checkpoint with one file per rank (no optimizer.safetensors: nothing was
    gathered); resumed from the epoch-1 checkpoint (after the unfreeze) the run ends bit-identical."""
    folder = strategies_run / "fsdp2" / "freeze_unfreeze"
    last = load_file(folder / "last.safetensors")
    assert last["head.layers.0.weight"].shape == (3, 64)
    assert torch.equal(last["head.layers.0.weight"], finals(folder)[0]["head.layers.0.weight"])
    ImageClassifier.load_from_checkpoint(folder / "model.safetensors")
    checkpoint = sorted((folder / "checkpoints").glob("step-*"))[1]
    assert sorted(p.name for p in (checkpoint / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "optimizer.safetensors").exists()
    assert "optimizer/__1_0.distcp" in json.loads((checkpoint / "manifest.json").read_text())
    resumed = finals(strategies_run / "fsdp2" / "resumed")[0]
    assert max_difference(resumed, finals(folder)[0]) == 0, "resume is bit-exact"


@pytest.mark.distributed
def test_a_sharded_checkpoint_resumes_in_another_process_count(strategies_run, image_folders):
    """The 2-rank epoch-1 checkpoint resumed by one process: the Adam moments it loads are the 2-rank run's
    whole moments (its 2 slices put together), and training goes on to the end."""
    out = strategies_run / "elsewhere"
    launch("resume_elsewhere", image_folders, out, processes=1, launcher="torchrun", worker=WORKER)
    saved = load_file(strategies_run / "fsdp2" / "freeze_unfreeze" / "moments_epoch1.safetensors")
    loaded = load_file(out / "moments_loaded.safetensors")
    assert saved.keys() == loaded.keys() and len(saved) == 62
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    report = json.loads((out / "rank0_report.json").read_text())
    assert report["world_size"] == 1 and [m["epoch"] for m in report["metrics"]] == [2]


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
