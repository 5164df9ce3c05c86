"""The lr schedule's curve, written out by hand: linear warmup from near zero, then the scheduler; every
scheduler's lr at every step; param groups added midway."""

from __future__ import annotations

import math

import pytest
import torch
from test_finetuning import Recorder, new_task, plain_data  # noqa: F401  (plain_data: the fixture)
from conftest import tiny_trainer

from dist_finetune.finetuning import BaseFinetuning
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


@pytest.mark.parametrize("scheduler, factor", [
    ("cosine", lambda progress: 0.5 * (1 + math.cos(math.pi * progress))),
    ("linear", lambda progress: 1 - progress),
    ("constant", lambda progress: 1.0),
])
def test_schedules_set_the_lr_of_every_step(plain_data, scheduler, factor):
    recorder = Recorder()
    tiny_trainer(max_epochs=2, lr=0.01, scheduler=scheduler, callbacks=[recorder]).finetune(new_task(), plain_data,
                                                                                           "freeze")
    steps = 12  # 24 images, batch 4, 2 epochs
    assert recorder.lrs == pytest.approx([0.01 * factor(step / steps) for step in range(1, steps + 1)], abs=1e-12)


def test_schedule_handles_group_added_midway():
    weights = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizer = torch.optim.AdamW([weights[0]], lr=1.0)
    schedule = WarmupSchedule(optimizer, total_steps=10, warmup_steps=2)
    for _ in range(4):
        schedule.step()
    factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
    group = BaseFinetuning.unfreeze_and_add_param_group(torch.nn.Linear(1, 1), optimizer)
    assert group["lr"] == pytest.approx(0.1 * factor) and group["initial_lr"] == pytest.approx(0.1)
    history = []
    for _ in range(6):
        schedule.step()
        history.append([g["lr"] for g in optimizer.param_groups])
    assert all(b == pytest.approx(a / 10) for a, b in history)
    assert history[-1] == [pytest.approx(0.0), pytest.approx(0.0)]
    state = schedule.state_dict()
    restored = WarmupSchedule(optimizer, total_steps=1)
    restored.load_state_dict(state)
    assert restored.step_count == 10
