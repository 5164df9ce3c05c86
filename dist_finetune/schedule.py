"""Learning-rate schedules that keep working when a strategy adds a param group mid-run.

torch's LambdaLR/OneCycleLR fix their per-group lists when built and fail once a group is added.
Here every step sets ``group["lr"] = group["initial_lr"] * factor(step)`` for whatever groups exist
now, so a group added at epoch N follows the same curve from the step it joins. Stepped once per
optimizer step by the trainer (not through ``accelerator.prepare``, which would step it once per
process).
"""

from __future__ import annotations

import math

import torch


class WarmupSchedule:
    """Linear warmup over ``warmup_steps``, then cosine / linear decay to 0, or constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, kind: str = "cosine"):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.optimizer = optimizer
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, warmup_steps)
        self.kind = kind
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_steps, self.warmup_steps, self.kind = state["total_steps"], state["warmup_steps"], state["kind"]
        self._apply()
