"""Backbone registry: a name -> a feature extractor with its classifier removed, its weights, its layers.

A *layer* is a coarse block that holds parameters, listed from input to output: for a ResNet the
stem (conv1+bn1), layer1, layer2, layer3, layer4; for MobileNet/EfficientNet each ``features``
block; for ConvNeXt the stem and each stage (with its downsampling); for ViT the patch embedding
(with class token and position embedding) and each encoder block; for timm models the blocks of
``group_matcher(coarse=True)``. Parameterless modules (pooling, activations) belong to no layer,
so "the last N layers" always unfreezes N blocks of real weights, whatever the architecture.
Every backbone parameter is in exactly one layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A feature extractor (``module(x) -> [N, num_features]``) and what a task needs to know about it."""

    name: str
    module: nn.Module
    num_features: int
    layer_names: list[list[str]]  # qualified names (modules or parameters) per layer, input -> output
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fixed_image_size: int | None = None  # e.g. ViT's position embeddings
    is_convnet: bool = True


Builder = Callable[[bool, "str | None"], Backbone]
_REGISTRY: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_backbone("mynet") def build(pretrained, weights) -> Backbone``."""

    def decorate(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return decorate


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, pretrained: bool = True, weights: str | None = None) -> Backbone:
    """Build a registered backbone, or any timm model as ``timm:NAME`` (timm installed)."""
    if name.startswith("timm:"):
        return _build_timm(name[len("timm:"):], pretrained, weights)
    if name not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}; registered: {', '.join(available_backbones())}; "
            "any timm model works as 'timm:NAME' when timm is installed"
        )
    return _REGISTRY[name](pretrained, weights)


class LayerGroup(nn.Module):
    """A view over one layer's modules and parameters (shares them; the backbone stays unchanged)."""

    def __init__(self, root: nn.Module, names: list[str]):
        super().__init__()
        self.names = list(names)
        for index, name in enumerate(names):
            slot = f"part{index}"
            try:
                self.add_module(slot, root.get_submodule(name))
            except AttributeError:
                self.register_parameter(slot, root.get_parameter(name))


def layer_groups(backbone: nn.Module, layer_names: list[list[str]]) -> list[LayerGroup]:
    return [LayerGroup(backbone, names) for names in layer_names]


def layer_modules(backbone: nn.Module, names: list[str]) -> tuple[list[nn.Module], list[str]]:
    """One layer as whole modules: the largest submodules of ``backbone`` whose parameters all belong to the
    layer ``names`` (its modules and parameters), and the layer's parameters no such module holds (a ViT's
    position embedding sits on the backbone itself). What FSDP2 shards, and checkpointing recomputes, as a unit."""
    group = LayerGroup(backbone, names)
    mine = {id(p) for p in group.parameters()}
    modules: dict[int, nn.Module] = {}
    loose = []
    for name, param in backbone.named_parameters():
        if id(param) not in mine:
            continue
        parts = name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            module = backbone.get_submodule(".".join(parts[:depth]))
            if all(id(p) in mine for p in module.parameters()):
                modules.setdefault(id(module), module)
                break
        else:
            loose.append(name)
    return list(modules.values()), loose


# ---------------------------------------------------------------------------------- weights


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt/.bin state dict loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise BackboneError(f"cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return state


def load_backbone_weights(module: nn.Module, state: dict[str, torch.Tensor], classifier_prefixes: tuple[str, ...],
                          source: str) -> None:
    """Load weights named as torchvision/timm name them, ignoring the original classifier's tensors."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefixes)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise BackboneError(
            f"weights in {source} do not fit this backbone: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, wrong shape {wrong_shape[:5]}. "
            "Pass the weights file of this exact architecture."
        )
    module.load_state_dict(state)


def _download_failed(name: str, error: Exception) -> BackboneError:
    return BackboneError(
        f"could not download pretrained weights for {name!r} ({type(error).__name__}: {error}). "
        "Offline? Pass a local weights file (weights='resnet18.safetensors' / --weights FILE, keys as "
        "torchvision or timm name them) or train from scratch with pretrained=False / --no-pretrained."
    )


# ----------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _TorchvisionArch:
    classifier_path: str  # the final Linear, replaced by Identity
    layers: Callable[[nn.Module], list[list[str]]]
    fixed_image_size: int | None = None
    is_convnet: bool = True


def _resnet_layers(model: nn.Module) -> list[list[str]]:
    return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


def _features_layers(extra_last: list[str]) -> Callable[[nn.Module], list[list[str]]]:
    def layers(model: nn.Module) -> list[list[str]]:
        groups = [[f"features.{i}"] for i in range(len(model.features))]
        groups[-1] += extra_last
        return groups

    return layers


def _convnext_layers(model: nn.Module) -> list[list[str]]:
    # stem, then each stage together with the downsampling that precedes it; final norm with the last
    count = len(model.features)
    groups = [["features.0"], ["features.1"]]
    groups += [[f"features.{i}", f"features.{i + 1}"] for i in range(2, count, 2)]
    groups[-1].append("classifier.0")
    return groups


def _vit_layers(model: nn.Module) -> list[list[str]]:
    blocks = [[f"encoder.layers.{name}"] for name, _ in model.encoder.layers.named_children()]
    blocks[-1].append("encoder.ln")
    return [["class_token", "conv_proj", "encoder.pos_embedding"], *blocks]


_TORCHVISION_ARCHS = {
    "resnet18": _TorchvisionArch("fc", _resnet_layers),
    "resnet34": _TorchvisionArch("fc", _resnet_layers),
    "resnet50": _TorchvisionArch("fc", _resnet_layers),
    "resnet101": _TorchvisionArch("fc", _resnet_layers),
    "mobilenet_v3_small": _TorchvisionArch("classifier.3", _features_layers(["classifier.0"])),
    "mobilenet_v3_large": _TorchvisionArch("classifier.3", _features_layers(["classifier.0"])),
    "efficientnet_b0": _TorchvisionArch("classifier.1", _features_layers([])),
    "efficientnet_b3": _TorchvisionArch("classifier.1", _features_layers([])),
    "convnext_tiny": _TorchvisionArch("classifier.2", _convnext_layers),
    "vit_b_16": _TorchvisionArch("heads.head", _vit_layers, fixed_image_size=224, is_convnet=False),
}


def _replace_classifier(model: nn.Module, path: str) -> int:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    linear = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return linear.in_features


def _build_torchvision(name: str, pretrained: bool, weights: str | None) -> Backbone:
    import torchvision

    arch = _TORCHVISION_ARCHS[name]
    model = torchvision.models.get_model(name, weights=None)
    default_weights = torchvision.models.get_model_weights(name).DEFAULT
    classifier_prefix = arch.classifier_path + "."
    num_features = _replace_classifier(model, arch.classifier_path)
    if weights is not None:
        load_backbone_weights(model, read_state_dict(weights), (classifier_prefix,), weights)
    elif pretrained:
        try:
            state = default_weights.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # noqa: BLE001 - URLError, HTTPError, timeouts, hash mismatch
            raise _download_failed(name, error) from error
        load_backbone_weights(model, state, (classifier_prefix,), str(default_weights))
    preprocessing = default_weights.transforms()
    return Backbone(
        name=name,
        module=model,
        num_features=num_features,
        layer_names=arch.layers(model),
        mean=tuple(preprocessing.mean),
        std=tuple(preprocessing.std),
        fixed_image_size=arch.fixed_image_size,
        is_convnet=arch.is_convnet,
    )


for _name in _TORCHVISION_ARCHS:
    register_backbone(_name)(lambda pretrained, weights, _n=_name: _build_torchvision(_n, pretrained, weights))


# ------------------------------------------------------------------------------------ timm


def _timm_layers(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(groups.items())]


def _build_timm(name: str, pretrained: bool, weights: str | None) -> Backbone:
    try:
        import timm
    except ImportError as error:
        raise BackboneError(f"backbone 'timm:{name}' needs timm: pip install 'dist_finetune[timm]'") from error
    if not timm.is_model(name):  # accepts pretrained tags too ("resnet18.a1_in1k"), which list_models omits
        raise BackboneError(f"timm has no model named {name!r} (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0)
    except Exception as error:  # noqa: BLE001 - hub/network errors surface as many types
        if pretrained and weights is None:
            raise _download_failed(f"timm:{name}", error) from error
        raise
    config = model.pretrained_cfg
    if weights is not None:
        classifier = config.get("classifier", "head")
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
        load_backbone_weights(model, read_state_dict(weights), prefixes, weights)
    patch_embed = getattr(model, "patch_embed", None)  # transformers with learned position embeddings
    fixed = None
    if patch_embed is not None and getattr(patch_embed, "strict_img_size", True):
        fixed = getattr(patch_embed, "img_size", (None,))[0]
    return Backbone(
        name=f"timm:{name}",
        module=model,
        num_features=model.num_features,
        layer_names=_timm_layers(model),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        fixed_image_size=fixed,
        is_convnet=fixed is None,
    )
