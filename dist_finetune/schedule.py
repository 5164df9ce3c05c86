"""Learning rates that keep working when a strategy adds a param group mid-run.

torch's LambdaLR/OneCycleLR fix their per-group lists when built and fail once a group is added.
Here every step sets ``group["lr"] = group["initial_lr"] * factor(step) * ramp(group, step)`` for
whatever groups exist now:

- ``factor``: linear warmup over ``warmup_steps``, then cosine / linear decay to 0, or constant;
  a group added at epoch N follows the same curve from the step it joins;
- ``ramp``: a group added mid-run (``joined_step`` in its dict) ramps linearly from ~0 to 1 over
  ``new_group_warmup_steps``. Adam-type optimizers move every weight by about lr from its first step
  whatever its gradient's size, so an unwarmed unfreeze throws away part of what the frozen phase
  learned; the ramp lets the moment estimates settle first.

Layer-wise lr decay (timm's ``--layer-decay`` convention) splits a group that spans several
backbone layers into one group per layer, scaled by ``decay ** distance`` from the head. The
schedule's step and each group's ``initial_lr``/``joined_step`` are saved with the optimizer, so
a resumed run continues the same curves (over this run's horizon, see ``resume``). Stepped once per
optimizer step by the trainer (not through ``accelerator.prepare``, which would step it once per
process).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


class WarmupSchedule:
    """Linear warmup, then cosine / linear decay to 0, or constant; new groups ramp in."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 kind: str = "cosine", new_group_warmup_steps: int = 0):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.optimizer = optimizer
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, warmup_steps)
        self.kind = kind
        self.new_group_warmup_steps = max(0, new_group_warmup_steps)
        self.step_count = 0
        for group in optimizer.param_groups:  # the groups the run starts with never ramp
            group.setdefault("joined_step", None)
        self.refresh()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def ramp(self, group: dict, step: int) -> float:
        """0 < ramp <= 1 for a group that joined ``step - joined_step`` steps ago; 1 for the first groups."""
        joined = group.get("joined_step")
        if joined is None or not self.new_group_warmup_steps:
            return 1.0
        return min(1.0, (step - joined + 1) / (self.new_group_warmup_steps + 1))

    def refresh(self) -> None:
        """Set every group's lr for the current step; groups added since the last call join now."""
        factor = self.factor(self.step_count)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("joined_step", self.step_count)
            group["lr"] = group["initial_lr"] * factor * self.ramp(group, self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self.refresh()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "new_group_warmup_steps": self.new_group_warmup_steps}

    def load_state_dict(self, state: dict, step_of: Callable[[int], int] | None = None) -> None:
        """Continue at the saved step on this schedule's own curve: the horizon, warmup and kind stay this
        run's (a larger max_epochs extends the decay instead of leaving the added steps at lr 0).

        ``step_of``: maps a step of the checkpoint's run onto this run's steps (another batch size or
        process count), applied to the step count and to every group's ``joined_step`` alike.
        """
        step_of = step_of or int
        self.step_count = step_of(int(state["step_count"]))
        for group in self.optimizer.param_groups:
            if group.get("joined_step") is not None:
                group["joined_step"] = step_of(group["joined_step"])
        self.refresh()


def layer_decay_scale(layer: int | None, num_layers: int, decay: float) -> float:
    """``decay ** distance from the head``: the backbone's last layer is 1 away, its first ``num_layers``.

    Parameters outside the backbone's layers (``layer`` None: the head) are not scaled.
    """
    return 1.0 if layer is None else decay ** (num_layers - layer)


def split_by_layer(optimizer: torch.optim.Optimizer, groups: Iterable[dict], layer_of: dict[int, int],
                   num_layers: int, decay: float) -> list[dict]:
    """Replace each of ``groups`` (just added: no optimizer state yet) by one group per backbone layer.

    ``layer_of``: ``id(param) -> layer index`` (input to output). Each new group keeps the old
    group's settings with ``lr``/``initial_lr`` scaled by :func:`layer_decay_scale`; parameters
    outside the layers (the head) come first, then the layers input to output. Returns the new groups.
    """
    groups = list(groups)
    kept = [g for g in optimizer.param_groups if not any(g is old for old in groups)]
    optimizer.param_groups[:] = kept
    added = []
    for group in groups:
        by_layer: dict[int | None, list] = {}
        for param in group["params"]:
            by_layer.setdefault(layer_of.get(id(param)), []).append(param)
        order = ([None] if None in by_layer else []) + sorted(k for k in by_layer if k is not None)
        for layer in order:
            scale = layer_decay_scale(layer, num_layers, decay)
            settings = {k: v for k, v in group.items() if k != "params"}
            settings.update(params=by_layer[layer], lr=group["lr"] * scale)
            if "initial_lr" in group:
                settings["initial_lr"] = group["initial_lr"] * scale
            optimizer.add_param_group(settings)
            added.append(optimizer.param_groups[-1])
    return added
