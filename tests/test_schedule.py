"""The lr schedule's curve, written out by hand: linear warmup from near zero, then the scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from dist_finetune.schedule import WarmupSchedule


def lrs(kind: str, steps: int = 8) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = WarmupSchedule(optimizer, total_steps=7, warmup_steps=3, kind=kind)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("kind, after_warmup", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
])
def test_warmup_ramps_linearly_then_the_scheduler_takes_over(kind, after_warmup):
    """3 warmup steps of 7: 1/4, 2/4, 3/4 of the lr, then the schedule over the 4 remaining steps."""
    assert lrs(kind) == pytest.approx([0.25, 0.5, 0.75, *after_warmup], abs=1e-12)
