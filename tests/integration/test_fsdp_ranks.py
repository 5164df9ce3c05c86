"""FSDP2 over two real gloo ranks (dist_finetune/fsdp.py): every strategy trains sharded per backbone layer,
ends where DDP ends, checkpoints the optimizer sharded and resumes bit-exact, with a sharded weight average."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed_ranks import launch

from dist_finetune import ImageClassifier


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
    if strategy == "freeze_unfreeze":  # with a weight average: each rank averaged its slices, as DDP the whole
        averages = [load_file(strategies_run / sharding / strategy / "rank0_ema.safetensors") for sharding in
                    ("fsdp2", "ddp")]
        assert max_difference(*averages) < 1e-5
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
    averages = [load_file(path / f"rank{rank}_ema.safetensors") for path, rank in
                ((folder, 0), (folder, 1), (strategies_run / "fsdp2" / "resumed", 0))]
    assert max_difference(*averages[:2]) == 0 and max_difference(averages[0], averages[2]) == 0, \
        "the weight average: one on both ranks, resumed bit-exact"
    assert "callbacks.safetensors" in json.loads((checkpoint / "manifest.json").read_text())


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
    assert "val_acc_ema" in report["metrics"][0], "the weight average, resharded onto one process, goes on"
