"""LoRA (``strategy="lora"``) through peft, an optional extra: low-rank adapters on the backbone's linears
(ViT family) or its convolutions and linears (conv nets), the backbone itself frozen, the head trained fully.

The adapters train as the backbone does under ``freeze_unfreeze``: the head alone until ``unfreeze_epoch``,
then the adapters join as one param group at lr / ``initial_denom_lr``, ramped in; so LoRA composes with
the schedule, layer decay, the DDP rebuild and the rank check like any strategy. BatchNorm stays as
pretrained (eval mode), so the pretrained backbone plus the adapters and the head rebuild the model.

Model files hold plain weights: each adapter merged into the weight it adapts, under the plain model's
names, so they load and predict without peft. ``<name>.adapter.safetensors`` beside a model file holds the
adapters and the head alone (small, to share; ``ImageClassifier.load_adapter``). Training-state
checkpoints hold the adapters as they train (resume is bit-exact). When training ends the adapters are
merged into the task's weights: it leaves ``finetune`` a plain model, as a model file loads.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .checkpoint import save_model
from .errors import CheckpointError, ConfigError
from .finetuning import (
    DEFAULT_INITIAL_DENOM_LR,
    DEFAULT_UNFREEZE_EPOCH,
    BaseFinetuning,
    FreezeUnfreeze,
    register_strategy,
    warn_never,
)
from .sharding import full_state_dict

DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 16.0
ADAPTER = "default"  # peft's adapter name; one adapter per model
ADAPTER_SUFFIX = ".adapter.safetensors"
INSTALL_HINT = "pip install 'dist_finetune[lora]'"


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ConfigError(f"strategy 'lora' needs the peft package: {INSTALL_HINT}") from error
    return peft


class LoRA(FreezeUnfreeze):
    """Adapters of rank ``rank`` (scaled by ``alpha / rank``) on ``targets`` (module names or glob patterns
    within the backbone; None: the backbone family's default, see :func:`lora_targets`); they join training
    at ``unfreeze_epoch`` at the head's lr / ``initial_denom_lr``; ``dropout`` on their input."""

    def __init__(self, rank: int = DEFAULT_LORA_RANK, alpha: float = DEFAULT_LORA_ALPHA,
                 targets: Sequence[str] | None = None, dropout: float = 0.0,
                 unfreeze_epoch: int = DEFAULT_UNFREEZE_EPOCH, initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR,
                 train_bn: bool = False):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"lora_rank (--lora-rank) must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ConfigError(f"lora_alpha (--lora-alpha) must be > 0 (adapters are scaled by alpha / rank), "
                              f"got {alpha}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"lora_dropout (--lora-dropout) must be in [0, 1), got {dropout}")
        if targets is not None and (isinstance(targets, str) or not targets or not all(targets)):
            raise ConfigError(f"lora_targets (--lora-targets) must be a non-empty list of module names or "
                              f"patterns, got {targets!r}")
        if train_bn:
            raise ConfigError("strategy 'lora' keeps BatchNorm as pretrained, so the pretrained backbone plus the "
                              "adapter file rebuild the model: use train_bn=False (no --train-bn)")
        _peft()
        super().__init__(unfreeze_epoch, train_bn=False, initial_denom_lr=initial_denom_lr)
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.targets = None if targets is None else tuple(targets)

    def validate(self, max_epochs: int) -> None:
        if self.unfreeze_epoch >= max_epochs:
            warn_never("lora adds the adapters", self.unfreeze_epoch, max_epochs)

    def freeze_before_training(self, model: nn.Module) -> None:
        """Adapters in, then the backbone frozen with them (they join at ``unfreeze_epoch``), BatchNorm in eval."""
        if not _lora_layers(model):  # a dry run replays the strategy on the task it has set up
            add_adapters(model, self.rank, self.alpha, self.dropout, lora_targets(model, self.targets))
        BaseFinetuning.freeze(model.backbone, train_bn=False)

    def finetune_function(self, model: nn.Module, epoch: int, optimizer) -> None:
        if epoch == self.unfreeze_epoch:
            adapters = [part for _, layer in _lora_layers(model) for part in (layer.lora_A, layer.lora_B)]
            self.unfreeze_and_add_param_group(adapters, optimizer, initial_denom_lr=self.initial_denom_lr,
                                              train_bn=False)


def _build(unfreeze_epoch: int, train_bn: bool, initial_denom_lr: float, lora_rank: int = DEFAULT_LORA_RANK,
           lora_alpha: float = DEFAULT_LORA_ALPHA, lora_targets: Sequence[str] | None = None,
           lora_dropout: float = 0.0, **_) -> LoRA:
    return LoRA(lora_rank, lora_alpha, lora_targets, lora_dropout, unfreeze_epoch, initial_denom_lr, train_bn)


register_strategy("lora", _build)


def _matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern it equals, ends with (after a dot), or matches as a glob."""
    return name == pattern or name.endswith(f".{pattern}") or fnmatch.fnmatchcase(name, pattern)


def lora_targets(task: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """The backbone modules (names within it) that take adapters: those ``patterns`` match, else every
    ``nn.Linear`` of a ViT-style backbone (attention and MLP projections) or every ``nn.Conv2d`` and
    ``nn.Linear`` of a conv net. Grouped and depthwise convolutions are skipped: peft cannot merge an
    adapter into them. Raises ConfigError, naming the backbone and the setting, when nothing matches."""
    kinds = (nn.Linear, nn.Conv2d) if task.is_convnet else (nn.Linear,)
    candidates = [name for name, module in task.backbone.named_modules()
                  if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1
                  and (isinstance(module, kinds) if patterns is None else any(_matches(name, p) for p in patterns))]
    if candidates:
        return candidates
    if patterns is not None:
        examples = [name for name, module in task.backbone.named_modules()
                    if isinstance(module, (nn.Linear, nn.Conv2d))]
        raise ConfigError(f"strategy 'lora': no Linear or Conv2d module (grouped convolutions excluded) of backbone "
                          f"{task.backbone_name} matches lora_targets {list(patterns)} (--lora-targets); its "
                          f"modules are named like {examples[:4]}")
    family = "conv net: Conv2d or Linear" if task.is_convnet else "ViT-style: Linear"
    raise ConfigError(f"strategy 'lora': backbone {task.backbone_name} has no module to adapt ({family}, grouped "
                      "convolutions excluded); name them with lora_targets (--lora-targets)")


def check_lora(strategy: BaseFinetuning, task: nn.Module, sharding: str) -> None:
    """Before anything starts: a LoRA run's targets exist on this task, and it is not sharded (adapters merge
    into whole weights)."""
    if not isinstance(strategy, LoRA):
        return
    if _lora_layers(task):
        raise ConfigError("strategy 'lora': the task already holds LoRA adapters (an earlier finetune that did "
                          "not finish); build a new ImageClassifier")
    if sharding == "fsdp2":
        raise ConfigError("strategy 'lora' trains a small fraction of the parameters and merges adapters into "
                          "whole weights: use sharding 'ddp', not 'fsdp2'")
    lora_targets(task, strategy.targets)


def add_adapters(task: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """Put adapters on ``targets`` (names within the backbone). Identical on every rank (A is drawn from the
    seeded global RNG; DDP also starts every rank from rank 0's)."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             bias="none")
    peft.inject_adapter_in_model(config, task.backbone, adapter_name=ADAPTER)
    # a layer listed by parameter names (timm's groups) takes an adapted module whole, so its adapters are in it
    adapted = set(targets)
    task.layer_names = [list(dict.fromkeys(name.rpartition(".")[0] if name.rpartition(".")[0] in adapted else name
                                           for name in names)) for names in task.layer_names]


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every LoRA layer in ``model``; none unless peft is loaded."""
    if sys.modules.get("peft") is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _merged_weight(layer) -> torch.Tensor:
    """The adapted weight with the adapter merged in (one formula for model files and the final merge)."""
    with torch.no_grad():
        return layer.get_base_layer().weight + layer.get_delta_weight(ADAPTER)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every adapter merged into the weight it adapts, under the plain model's
    names (no ``base_layer``, no ``lora_`` tensors); the state dict itself for a model without adapters."""
    state = dict(model.state_dict())
    for name, layer in _lora_layers(model):
        prefix, base = f"{name}.", f"{name}.base_layer."
        for key in [k for k in state if k.startswith(f"{prefix}lora_")]:
            del state[key]
        for key in [k for k in state if k.startswith(base)]:
            state[prefix + key[len(base):]] = state.pop(key)
        state[f"{prefix}weight"] = _merged_weight(layer)
    return state


def file_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a model file holds: whole tensors (gathering sharded ones is collective), adapters merged into the
    weights they adapt, under the plain model's names."""
    return full_state_dict(merged_state_dict(model))


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its weight and put the plain layer back: the model is then what its model file
    loads as (equal weights, bit for bit)."""
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        merged = _merged_weight(layer)
        with torch.no_grad():
            base.weight.copy_(merged)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, base)


def adapter_path(model_path: str | os.PathLike) -> Path:
    """``model.safetensors`` -> ``model.adapter.safetensors``."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ADAPTER_SUFFIX)


def save_adapter(model: nn.Module, model_path: str | os.PathLike, metadata: dict) -> None:
    """Beside a model file of an adapted task: its adapters and head, with the model file's ``metadata`` and
    the LoRA settings (rank, alpha, dropout, the adapted modules); nothing for a task without adapters."""
    layers = _lora_layers(model)
    if not layers:
        return
    first = layers[0][1]
    settings = {"rank": first.r[ADAPTER], "alpha": first.lora_alpha[ADAPTER],
                "dropout": getattr(first.lora_dropout[ADAPTER], "p", 0.0),
                "targets": [name.removeprefix("backbone.") for name, _ in layers]}
    tensors = {key: value for key, value in model.state_dict().items() if ".lora_" in key or key.startswith("head.")}
    save_model(adapter_path(model_path), tensors, {**metadata, "lora": settings})


def load_adapter_into(task: nn.Module, tensors: dict[str, torch.Tensor], settings: dict, source: str) -> None:
    """Adapters as ``settings`` describe them, loaded with the head from ``tensors``, then merged: ``task``
    (the pretrained backbone) becomes the model the adapter file was saved from."""
    add_adapters(task, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
    result = task.load_state_dict(tensors, strict=False)
    missing = [key for key in result.missing_keys if ".lora_" in key or key.startswith("head.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source} does not fit backbone {task.backbone_name}: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    merge_adapters(task)
