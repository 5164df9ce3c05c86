"""Finetuning strategies: which parts of the model train from which epoch, and with which lr.

The hooks follow Lightning's ``BaseFinetuning``: ``freeze_before_training(model)`` runs once before
the optimizer is built, ``finetune_function(model, epoch, optimizer)`` at the start of every epoch.
Strategies only flip ``requires_grad`` and add param groups; the trainer notices the change and
re-synchronises the distributed wrapper, so a custom strategy never touches DDP itself.

Frozen BatchNorm (``train_bn=False``) is held in eval mode, so its running statistics stay exactly
as loaded, instead of Lightning's ``track_running_stats=False`` (which normalises with batch
statistics). Strategies are deterministic functions of the epoch, so replaying them rebuilds the
optimizer's group layout on resume.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_FROZEN_NORM = "_dist_finetune_frozen_norm"

def _as_module_list(modules) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    return [m for item in modules for m in _as_module_list(item)]


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Put frozen BatchNorm layers back in eval mode (call after ``model.train()``)."""
    for module in model.modules():
        if getattr(module, _FROZEN_NORM, False):
            module.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class BaseFinetuning:
    """Base for strategies. ``attr_names``: the model attributes frozen before training."""

    def __init__(self, attr_names: str | Sequence[str] = "backbone", train_bn: bool = True):
        self.attr_names = [attr_names] if isinstance(attr_names, str) else list(attr_names)
        self.train_bn = train_bn

    # ------------------------------------------------------------------ hooks to override

    def freeze_before_training(self, model: nn.Module) -> None:
        """Called once, before the optimizer exists: freeze what should not train at first."""
        modules = []
        for name in self.attr_names:
            if not hasattr(model, name):
                raise AttributeError(f"{type(self).__name__}: the model has no attribute {name!r} to freeze")
            modules.append(getattr(model, name))
        self.freeze(modules, train_bn=self.train_bn)

    def finetune_function(self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Called at the start of every epoch: unfreeze and add param groups here."""

    def validate(self, max_epochs: int) -> None:
        """Raise ValueError before training when the schedule cannot run within ``max_epochs``."""

    # ---------------------------------------------------------------------------- helpers

    @staticmethod
    def freeze(modules, train_bn: bool = True) -> None:
        """Stop gradients for ``modules``; BatchNorm layers keep training when ``train_bn``."""
        for module in _as_module_list(modules):
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    for param in sub.parameters(recurse=False):
                        param.requires_grad = train_bn
                    setattr(sub, _FROZEN_NORM, not train_bn)
                    if not train_bn:
                        sub.eval()
                else:
                    for param in sub.parameters(recurse=False):
                        param.requires_grad = False

    @staticmethod
    def make_trainable(modules, train_bn: bool = True) -> None:
        """Let ``modules`` train again; BatchNorm layers stay frozen (eval) unless ``train_bn``."""
        for module in _as_module_list(modules):
            for sub in module.modules():
                if isinstance(sub, _BatchNorm) and not train_bn:
                    continue
                for param in sub.parameters(recurse=False):
                    param.requires_grad = True
                if isinstance(sub, _BatchNorm):
                    setattr(sub, _FROZEN_NORM, False)  # the next model.train() puts it in train mode

    @staticmethod
    def unfreeze_and_add_param_group(
        modules,
        optimizer: torch.optim.Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> dict | None:
        """Unfreeze ``modules`` and add their new trainable parameters as one param group.

        The group's lr defaults to the first group's current lr / ``initial_denom_lr``. The schedule
        scales the group like every other: its base lr (``initial_lr``) is the first group's base
        lr / ``initial_denom_lr``, or exactly ``lr`` when given. Parameters already in the optimizer
        are skipped. Returns the group added, or None when there was nothing new to add.
        """
        BaseFinetuning.make_trainable(modules, train_bn=train_bn)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params, seen = [], set()
        for module in _as_module_list(modules):
            for param in module.parameters():
                if param.requires_grad and id(param) not in in_optimizer and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        if not params:
            warnings.warn("unfreeze_and_add_param_group: no new trainable parameters; no group added")
            return None
        first = optimizer.param_groups[0]
        if lr is None:
            group = {"params": params, "lr": first["lr"] / initial_denom_lr,
                     "initial_lr": first.get("initial_lr", first["lr"]) / initial_denom_lr}
        else:
            factor = first["lr"] / first["initial_lr"] if first.get("initial_lr") else 1.0
            group = {"params": params, "lr": float(lr) * factor, "initial_lr": float(lr)}
        optimizer.add_param_group(group)
        return optimizer.param_groups[-1]

    # ----------------------------------------------------------------------- for the trainer

    def call_finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        """Call ``finetune_function``, also in Flash's older form with a trailing ``opt_idx``."""
        parameters = inspect.signature(self.finetune_function).parameters
        if len(parameters) >= 4:
            self.finetune_function(model, epoch, optimizer, 0)
        else:
            self.finetune_function(model, epoch, optimizer)

    def describe(self) -> dict:
        """Name and plain settings: a resumed run must use the same strategy."""
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and _is_plain(v)}
        return {"name": type(self).__name__, **settings}


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


class NoFreeze(BaseFinetuning):
    """Backbone and head train from the first epoch."""

    def freeze_before_training(self, model: nn.Module) -> None:
        return None


class Freeze(BaseFinetuning):
    """The backbone stays frozen for the whole run; only the head trains."""


class FreezeUnfreeze(BaseFinetuning):
    """Frozen for epochs 0..unfreeze_epoch-1; the whole backbone joins at ``unfreeze_epoch``."""

    def __init__(self, unfreeze_epoch: int = 10, train_bn: bool = True, attr_names="backbone"):
        super().__init__(attr_names, train_bn)
        if unfreeze_epoch < 0:
            raise ValueError(f"unfreeze_epoch must be >= 0, got {unfreeze_epoch}")
        self.unfreeze_epoch = unfreeze_epoch

    def validate(self, max_epochs: int) -> None:
        if self.unfreeze_epoch >= max_epochs:
            raise ValueError(
                f"unfreeze_epoch={self.unfreeze_epoch} but max_epochs={max_epochs} (epochs count from 0): "
                "the backbone would never train; lower unfreeze_epoch or raise max_epochs"
            )

    def finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        if epoch == self.unfreeze_epoch:
            modules = [getattr(model, name) for name in self.attr_names]
            self.unfreeze_and_add_param_group(modules, optimizer, train_bn=self.train_bn)


class UnfreezeMilestones(BaseFinetuning):
    """Frozen until epoch a; the last ``num_layers`` backbone layers join at a, the rest at b.

    Layers are the backbone's coarse blocks (``model.backbone_layers()``), see ``backbones``.
    """

    def __init__(self, unfreeze_milestones: tuple[int, int] = (5, 10), num_layers: int = 1, train_bn: bool = True):
        super().__init__("backbone", train_bn)
        first, second = unfreeze_milestones
        if not 0 <= first < second:
            raise ValueError(f"unfreeze_milestones must be increasing epochs (a < b), got {unfreeze_milestones}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.unfreeze_milestones = (first, second)
        self.num_layers = num_layers

    def validate(self, max_epochs: int) -> None:
        if self.unfreeze_milestones[1] >= max_epochs:
            raise ValueError(
                f"unfreeze_milestones={self.unfreeze_milestones} but max_epochs={max_epochs} "
                "(epochs count from 0): the second milestone would never be reached"
            )

    def finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        layers = model.backbone_layers()
        if self.num_layers >= len(layers):
            raise ValueError(f"num_layers={self.num_layers} but the backbone has only {len(layers)} layers")
        if epoch == self.unfreeze_milestones[0]:
            self.unfreeze_and_add_param_group(layers[-self.num_layers:], optimizer, train_bn=self.train_bn)
        elif epoch == self.unfreeze_milestones[1]:
            self.unfreeze_and_add_param_group(layers[: -self.num_layers], optimizer, train_bn=self.train_bn)


def resolve_strategy(strategy, train_bn: bool = True) -> BaseFinetuning:
    """A strategy object from a name, a Flash-style tuple, or a ``BaseFinetuning`` instance.

    Names: "no_freeze", "freeze", "freeze_unfreeze" (unfreeze at epoch 10), "unfreeze_milestones"
    ((5, 10), 1 layer); tuples: ("freeze_unfreeze", N), ("unfreeze_milestones", ((a, b), k)).
    """
    if isinstance(strategy, BaseFinetuning):
        return strategy
    name, argument = (strategy, None) if isinstance(strategy, str) else (tuple(strategy) + (None,))[:2]
    if name == "no_freeze":
        return NoFreeze(train_bn=train_bn)
    if name == "freeze":
        return Freeze(train_bn=train_bn)
    if name == "freeze_unfreeze":
        return FreezeUnfreeze(10 if argument is None else int(argument), train_bn=train_bn)
    if name == "unfreeze_milestones":
        milestones, layers = ((5, 10), 1) if argument is None else argument
        return UnfreezeMilestones(tuple(milestones), int(layers), train_bn=train_bn)
    raise ValueError(
        f"unknown strategy {strategy!r}: use 'no_freeze', 'freeze', 'freeze_unfreeze', "
        "'unfreeze_milestones', a (name, argument) tuple, or a BaseFinetuning subclass instance"
    )
