"""benchmarks/fsdp_memory.py --quick: 2 real gloo ranks, what each holds under DDP and FSDP2, counted from
the model's parameter shapes (FSDP2 splits every parameter's rows over the ranks: rank 0 gets the rounded-up
half, so a 1-row tensor such as the class token lies whole on rank 0)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import fsdp_memory
from dist_finetune import ImageClassifier

pytestmark = pytest.mark.distributed
FP32 = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_memory") / "memory.json"
    runs = ["ddp/no_freeze", "fsdp2/no_freeze", "fsdp2+ac/unfrozen"]
    assert fsdp_memory.main(["--quick", "--runs", *runs, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def shard_elements(shape: tuple[int, ...], rank: int) -> int:
    rows = shape[0] if shape else 1
    rank0_rows = math.ceil(rows / 2)
    return (rank0_rows if rank == 0 else rows - rank0_rows) * math.prod(shape[1:])


def test_fsdp2_ranks_hold_their_row_halves_of_weights_gradients_and_adamw_state(report):
    """timm test_vit + a 2-class head: 80 tensors, 306,370 fp32 elements. DDP: every rank all of it, a gradient
    of the same size, AdamW two moments of it plus a 4-byte step per tensor. FSDP2: each rank its rows."""
    shapes = [tuple(p.shape) for p in ImageClassifier(2, backbone="timm:test_vit", pretrained=False).parameters()]
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == (80, 306370)
    for rank in (0, 1):
        ddp = report["ranks"]["ddp/no_freeze"][rank]["measured"]
        assert ddp["parameters"] == ddp["gradients"] == 306370 * FP32
        assert ddp["optimizer"] == 2 * 306370 * FP32 + 80 * 4
        fsdp = report["ranks"]["fsdp2/no_freeze"][rank]["measured"]
        local = sum(shard_elements(shape, rank) for shape in shapes) * FP32
        assert fsdp["parameters"] == fsdp["gradients"] == local
        assert fsdp["optimizer"] == 2 * local + 80 * 4
    halves = [report["ranks"]["fsdp2/no_freeze"][rank]["measured"]["parameters"] for rank in (0, 1)]
    assert sum(halves) == 306370 * FP32 and max(halves) < 0.52 * 306370 * FP32
    assert report["rows"]["fsdp2/no_freeze"]["states"] / report["rows"]["ddp/no_freeze"]["states"] < 0.52


def test_before_the_unfreeze_only_the_head_has_gradients_and_optimizer_state(report):
    """freeze_unfreeze under FSDP2 + activation checkpointing: in epoch 0 each rank has gradients and AdamW
    state for its row of the head (Linear 64 -> 2: one weight row and one bias each), none for the frozen
    backbone; at the measured step of epoch 1 for all its parameters."""
    for rank in (0, 1):
        frozen = report["ranks"]["fsdp2+ac/unfrozen"][rank]["before_unfreeze"]
        head = (64 + 1) * FP32
        assert frozen["trainable"] == frozen["gradients"] == head
        assert frozen["optimizer"] == 2 * head + 2 * 4
        after = report["ranks"]["fsdp2+ac/unfrozen"][rank]["measured"]
        assert after["gradients"] == after["parameters"] == after["trainable"]


def test_activation_checkpointing_holds_fewer_activation_bytes(report):
    """Same model, batch and step (all layers train): recomputed layers keep only their inputs."""
    rows = report["rows"]
    assert 0 < rows["fsdp2+ac/unfrozen"]["activations"] < rows["fsdp2/no_freeze"]["activations"]
    assert rows["fsdp2/no_freeze"]["peak_live"] < rows["ddp/no_freeze"]["peak_live"]
