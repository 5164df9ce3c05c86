"""Finetuning strategies: which parts of the model train from which epoch, and with which lr.

The hooks follow Lightning's ``BaseFinetuning``: ``freeze_before_training(model)`` runs once before
the optimizer is built, ``finetune_function(model, epoch, optimizer)`` at the start of every epoch.
Strategies only flip ``requires_grad`` and add param groups; the trainer notices the change and
re-synchronises the distributed wrapper, so a custom strategy never touches DDP itself.

Frozen BatchNorm (``train_bn=False``, the built-in strategies' default) is held in eval mode, so
its running statistics stay exactly as loaded, instead of Lightning's ``track_running_stats=False``
(which normalises with batch statistics). Strategies are deterministic functions of the epoch, so
replaying them rebuilds the optimizer's group layout on resume. The defaults and the checks of the
built-in strategies' settings live here only (their constructors); ``config.StrategyConfig`` builds
through :func:`build_strategy`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .callbacks import Callback
from .errors import ConfigError
from .schedule import split_by_layer

_FROZEN_NORM = "_dist_finetune_frozen_norm"

STRATEGY_NAMES = ("no_freeze", "freeze", "freeze_unfreeze", "unfreeze_milestones")
DEFAULT_UNFREEZE_EPOCH = 3
DEFAULT_MILESTONES = (2, 5)
DEFAULT_NUM_LAYERS = 1
# a group the built-in strategies add trains at the head's lr / this (Flash's ``initial_denom_lr``, whose
# default 10 stays for BaseFinetuning subclasses; fastai's fine_tune uses 100): measured, README Defaults
DEFAULT_INITIAL_DENOM_LR = 100.0
# BatchNorm of frozen blocks in eval mode: running statistics stay as pretrained, and backward never
# runs through a frozen backbone (Flash's train_bn=True keeps it running through every BatchNorm)
BUILTIN_TRAIN_BN = False


def check_unfreeze_epoch(unfreeze_epoch: int) -> None:
    if unfreeze_epoch < 0:
        raise ConfigError(f"unfreeze_epoch must be >= 0, got {unfreeze_epoch}")


def check_initial_denom_lr(initial_denom_lr: float) -> None:
    if not initial_denom_lr > 0:
        raise ConfigError(f"initial_denom_lr must be > 0 (new groups train at lr / initial_denom_lr), "
                          f"got {initial_denom_lr}")


def check_milestones(milestones, num_layers: int) -> None:
    if len(tuple(milestones)) != 2:
        raise ConfigError(f"unfreeze_milestones takes two epochs (a, b), got {milestones}")
    first, second = milestones
    if not 0 <= first < second:
        raise ConfigError(f"unfreeze_milestones must be increasing epochs (0 <= a < b), got {tuple(milestones)}")
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")


def warn_never(what: str, epoch: int, max_epochs: int) -> None:
    warnings.warn(f"{what} at epoch {epoch} but max_epochs={max_epochs} (epochs count from 0): it never happens in "
                  "this run, which trains the frozen model only", UserWarning, stacklevel=3)

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
        """Called before training: raise ConfigError for a schedule that cannot work, warn for one that never fires."""

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

    def __init__(self, train_bn: bool = BUILTIN_TRAIN_BN, attr_names="backbone"):
        super().__init__(attr_names, train_bn)

    def freeze_before_training(self, model: nn.Module) -> None:
        return None


class Freeze(BaseFinetuning):
    """The backbone stays frozen for the whole run; only the head trains."""

    def __init__(self, train_bn: bool = BUILTIN_TRAIN_BN, attr_names="backbone"):
        super().__init__(attr_names, train_bn)


class FreezeUnfreeze(BaseFinetuning):
    """Frozen for epochs 0..unfreeze_epoch-1; the whole backbone joins at ``unfreeze_epoch``."""

    def __init__(self, unfreeze_epoch: int = DEFAULT_UNFREEZE_EPOCH, train_bn: bool = BUILTIN_TRAIN_BN,
                 attr_names="backbone", initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR):
        super().__init__(attr_names, train_bn)
        check_unfreeze_epoch(unfreeze_epoch)
        check_initial_denom_lr(initial_denom_lr)
        self.unfreeze_epoch = unfreeze_epoch
        self.initial_denom_lr = float(initial_denom_lr)

    def validate(self, max_epochs: int) -> None:
        if self.unfreeze_epoch >= max_epochs:
            warn_never("freeze_unfreeze unfreezes the backbone", self.unfreeze_epoch, max_epochs)

    def finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        if epoch == self.unfreeze_epoch:
            modules = [getattr(model, name) for name in self.attr_names]
            self.unfreeze_and_add_param_group(modules, optimizer, initial_denom_lr=self.initial_denom_lr,
                                              train_bn=self.train_bn)


class UnfreezeMilestones(BaseFinetuning):
    """Frozen until epoch a; the last ``num_layers`` backbone layers join at a, the rest at b.

    Layers are the backbone's coarse blocks (``model.backbone_layers()``), see ``backbones``.
    """

    def __init__(self, unfreeze_milestones: tuple[int, int] = DEFAULT_MILESTONES,
                 num_layers: int = DEFAULT_NUM_LAYERS, train_bn: bool = BUILTIN_TRAIN_BN,
                 initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR):
        super().__init__("backbone", train_bn)
        check_milestones(unfreeze_milestones, num_layers)
        check_initial_denom_lr(initial_denom_lr)
        self.unfreeze_milestones = tuple(unfreeze_milestones)
        self.num_layers = num_layers
        self.initial_denom_lr = float(initial_denom_lr)

    def validate(self, max_epochs: int) -> None:
        first, second = self.unfreeze_milestones
        if first >= max_epochs:
            warn_never(f"unfreeze_milestones unfreezes the last {self.num_layers} layer(s)", first, max_epochs)
        elif second >= max_epochs:
            warn_never("unfreeze_milestones unfreezes the remaining layers", second, max_epochs)

    def finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        layers = model.backbone_layers()
        if self.num_layers >= len(layers):
            raise ConfigError(f"num_layers={self.num_layers} but the backbone has only {len(layers)} layers")
        if epoch in self.unfreeze_milestones:
            joining = layers[-self.num_layers:] if epoch == self.unfreeze_milestones[0] else layers[: -self.num_layers]
            self.unfreeze_and_add_param_group(joining, optimizer, initial_denom_lr=self.initial_denom_lr,
                                              train_bn=self.train_bn)


_REGISTERED: dict[str, Callable[..., BaseFinetuning]] = {}  # strategies of later modules (lora.py), by name


def register_strategy(name: str, builder: Callable[..., BaseFinetuning]) -> None:
    """``build_strategy(name, ...)``, the one path from a name to a strategy, returns ``builder(**every setting)``
    (the builder takes those it uses)."""
    _REGISTERED[name] = builder


def strategy_names() -> tuple[str, ...]:
    return STRATEGY_NAMES + tuple(_REGISTERED)


def build_strategy(name: str, unfreeze_epoch: int = DEFAULT_UNFREEZE_EPOCH,
                   milestones: tuple[int, int] = DEFAULT_MILESTONES, num_layers: int = DEFAULT_NUM_LAYERS,
                   train_bn: bool = BUILTIN_TRAIN_BN, initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR,
                   **settings) -> BaseFinetuning:
    """The strategy ``name`` with the settings it uses (the others are ignored; ``settings``: those of registered
    strategies, e.g. ``lora_rank``); the strategies' constructors check them, the one place they are checked
    (``config.StrategyConfig`` builds through here)."""
    if name == "no_freeze":
        return NoFreeze(train_bn=train_bn)
    if name == "freeze":
        return Freeze(train_bn=train_bn)
    if name == "freeze_unfreeze":
        return FreezeUnfreeze(unfreeze_epoch, train_bn=train_bn, initial_denom_lr=initial_denom_lr)
    if name == "unfreeze_milestones":
        return UnfreezeMilestones(milestones, num_layers, train_bn=train_bn, initial_denom_lr=initial_denom_lr)
    if name in _REGISTERED:
        return _REGISTERED[name](unfreeze_epoch=unfreeze_epoch, milestones=milestones, num_layers=num_layers,
                                 train_bn=train_bn, initial_denom_lr=initial_denom_lr, **settings)
    raise ConfigError(f"unknown strategy {name!r}: use one of {', '.join(map(repr, strategy_names()))}, a (name, "
                      "argument) tuple, or a BaseFinetuning subclass instance")


def resolve_strategy(strategy, train_bn: bool | None = None,
                     initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR) -> BaseFinetuning:
    """A strategy object from a name, a Flash-style tuple, or a ``BaseFinetuning`` instance (used as it is).

    Names use the defaults above; tuples: ("freeze_unfreeze", N), ("unfreeze_milestones", ((a, b), k)).
    ``train_bn=None``: the built-in strategies' default (frozen BatchNorm in eval mode).
    """
    if isinstance(strategy, BaseFinetuning):
        return strategy
    train_bn = BUILTIN_TRAIN_BN if train_bn is None else train_bn
    name, argument = (strategy, None) if isinstance(strategy, str) else (tuple(strategy) + (None,))[:2]
    settings = {}
    if argument is not None and name == "freeze_unfreeze":
        settings = {"unfreeze_epoch": int(argument)}
    elif argument is not None and name == "unfreeze_milestones":
        settings = {"milestones": tuple(argument[0]), "num_layers": int(argument[1])}
    return build_strategy(name, train_bn=train_bn, initial_denom_lr=initial_denom_lr, **settings)


def _layer_label(names: list[str]) -> str:
    """A short name for a layer: the dotted prefix its parts share ("layer4"), else their roots ("conv1+bn1")."""
    parts = [name.split(".") for name in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if common and (len(names) > 1 or len(common) == len(parts[0])):
        return ".".join(common)
    return "+".join(dict.fromkeys(part[0] for part in parts))


def layer_index(model: nn.Module) -> tuple[dict[int, int], list[str]]:
    """``id(param) -> index of its backbone layer`` (input to output) and the layers' short names."""
    layers = model.backbone_layers()
    index = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    return index, [_layer_label(layer.names) for layer in layers]


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """AdamW or SGD (``config``: a TrainerConfig) over what trains now; with ``layer_decay``, one group per
    trainable backbone layer (the head's group first)."""
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("nothing to train: the strategy froze every parameter before training")
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.layer_decay is not None and config.layer_decay != 1.0:
        index, names = layer_index(model)
        if any(id(p) in index for p in params):
            split_by_layer(optimizer, list(optimizer.param_groups), index, len(names), config.layer_decay)
    return optimizer


class StrategyCallback(Callback):
    """Runs a :class:`BaseFinetuning` strategy inside the trainer, as Lightning's BaseFinetuning is a callback.

    ``setup`` freezes, ``on_epoch_start`` calls ``finetune_function``. Groups a strategy adds are
    split per backbone layer when ``layer_decay`` is set, then join the schedule (which ramps them
    in). Its state is how many epochs' hooks ran; restoring it replays them, which rebuilds the
    frozen/unfrozen layout and the param groups the checkpointed optimizer state expects.
    """

    def __init__(self, strategy: BaseFinetuning, layer_decay: float | None = None):
        self.strategy = strategy
        self.layer_decay = layer_decay
        self.epochs_applied = 0
        self.joined: list[str] = []  # layers that joined at the current epoch's start
        self._added = 0  # param groups added at the current epoch's start
        self.run = None

    def setup(self, trainer, run) -> None:
        self.run = run
        self.strategy.freeze_before_training(run.task)

    def on_epoch_start(self, trainer, run) -> None:
        self.joined = self._apply(run, run.position.epoch)
        if self.joined and run.is_main_process:
            groups = run.optimizer.param_groups
            lrs = ", ".join(f"{g['initial_lr']:.2e}" for g in groups[len(groups) - self._added:])
            trainer.announce(f"epoch {run.position.epoch}: {', '.join(self.joined)} joined training "
                             f"({self._added} param group(s), target lr {lrs})")

    def on_validation_end(self, trainer, run, record: dict) -> None:
        if self.joined:
            record["joined"] = self.joined

    def state_dict(self) -> dict:
        return {"epochs_applied": self.epochs_applied, "joined": self.joined}

    def load_state_dict(self, state: dict) -> None:
        for epoch in range(state.get("epochs_applied", 0)):
            self._apply(self.run, epoch)
        self.joined = state.get("joined", [])  # a run resumed mid-epoch still reports who joined at its start

    def _apply(self, run, epoch: int) -> list[str]:
        """The strategy's hook for ``epoch``; returns the names of the layers whose parameters joined."""
        optimizer = run.optimizer
        before = len(optimizer.param_groups)
        self.strategy.call_finetune_function(run.task, epoch, optimizer)
        new_groups = optimizer.param_groups[before:]
        self._added = len(new_groups)
        self.epochs_applied = epoch + 1
        if not new_groups:
            return []
        index, names = layer_index(run.task)
        if self.layer_decay is not None and self.layer_decay != 1.0:
            new_groups = split_by_layer(optimizer, new_groups, index, len(names), self.layer_decay)
            self._added = len(new_groups)
        if run.schedule is not None:
            run.schedule.refresh()  # the new groups join the schedule (and its ramp) at this step
        layers = sorted({index[id(p)] for g in new_groups for p in g["params"] if id(p) in index})
        return [names[i] for i in layers] or ["(parameters outside the backbone's layers)"]
