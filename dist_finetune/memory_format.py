"""channels_last or contiguous: on for conv nets on a GPU, off on the CPU unless asked for and checked.

channels_last is a speed choice and must never change the math. On the CPU, oneDNN's channels_last
training path does: a 1x1 convolution with stride > 1 and fewer input channels than oneDNN's block
of 16 writes past its workspace in backward (uxlfoundation/oneDNN#6035), which crashed training on
AVX-512 CPUs (the tests' 8-16-32-64 ResNet, batch 3, 32 px) and gave wrong gradients on AVX2 ones;
and backbones without that shape got wrong gradients too (random init, batch 8, relative to the
contiguous ones: timm efficientnet_lite0 1.2e-3 at 32 px, resnet18 4.9e-3 at 64 px; both layouts
agree without oneDNN or with BatchNorm in eval mode). So the CPU trains contiguous by default, and
``channels_last=True`` on the CPU is honoured only for a model that passes two checks: no convolution
of the crash shape (checked statically, so it never reaches oneDNN), then one float32 batch at the
run's image and batch size whose gradients agree in both layouts. A model that fails trains
contiguous, with a warning that says why.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_CHANNEL_BLOCK = 16  # a strided 1x1 convolution with fewer input channels hits oneDNN#6035
# relative L2 distance of the gradients, channels_last vs contiguous: where both are right it stayed
# below 7e-5 (random-init resnet18, mobilenet_v3_small, efficientnet_b0 at 32-64 px, batch 8, on
# AVX-512 and AVX2); the affected models were 1.2e-3 and more off
GRADIENT_TOLERANCE = 3e-4
_ISSUE = "oneDNN's channels_last backward on the CPU (uxlfoundation/oneDNN#6035)"


def channels_last_by_default(model: nn.Module, device: torch.device) -> bool:
    """The automatic choice (``channels_last=None``): conv nets on a GPU (tensor cores), never on the CPU."""
    return bool(getattr(model, "is_convnet", False)) and device.type == "cuda"


def crash_prone_convolution(model: nn.Module) -> str | None:
    """The name of a convolution oneDNN#6035 crashes on (1x1 kernel, stride > 1, few input channels)."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and max(module.stride) > 1
                and module.in_channels < ONEDNN_CHANNEL_BLOCK):
            return name
    return None


def channels_last_gradient_difference(model: nn.Module, image_size: int, batch_size: int) -> float:
    """Relative L2 distance of one float32 batch's gradients (all parameters, BatchNorm in training
    mode), channels_last vs contiguous. Runs on copies inside a forked RNG: ``model``'s weights,
    gradients, BatchNorm statistics and the random state are left as they were."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
    gradients = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        trial = copy.deepcopy(model).float().to(memory_format=memory_format)
        nn.Module.train(trial)  # frozen BatchNorms too: a later unfreeze trains them
        for parameter in trial.parameters():
            parameter.requires_grad_(True)
            parameter.grad = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout in both layouts
            logits = trial(images.contiguous(memory_format=memory_format))
            labels = torch.randint(0, logits.shape[1], (batch_size,), generator=generator.manual_seed(1))
            F.cross_entropy(logits.float(), labels).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in trial.parameters() if p.grad is not None]))
        del trial, logits
    contiguous, channels_last = gradients
    return ((channels_last - contiguous).norm() / contiguous.norm()).item()


def channels_last_problem(model: nn.Module, image_size: int, batch_size: int) -> str | None:
    """Why channels_last would crash or change the gradients of ``model`` on the CPU; None if it is safe."""
    convolution = crash_prone_convolution(model)
    if convolution is not None:
        conv = model.get_submodule(convolution)
        return (f"convolution {convolution!r} (1x1, stride {max(conv.stride)}, {conv.in_channels} input channels "
                f"< {ONEDNN_CHANNEL_BLOCK}) crashes {_ISSUE}")
    difference = channels_last_gradient_difference(model, image_size, batch_size)
    if not difference <= GRADIENT_TOLERANCE:  # NaN fails too
        return (f"its gradients in channels_last differ from the contiguous ones by {difference:.1e} "
                f"(relative; tolerance {GRADIENT_TOLERANCE:.0e}) in {_ISSUE}")
    return None


def resolve_channels_last(requested: bool | None, model: nn.Module, device: torch.device, image_size: int,
                          batch_size: int) -> bool:
    """``TrainerConfig.channels_last`` for this run: None is :func:`channels_last_by_default`; True on the
    CPU is checked first (:func:`channels_last_problem`) and falls back to contiguous with a warning."""
    if requested is None:
        return channels_last_by_default(model, device)
    if not requested or device.type != "cpu":
        return requested
    problem = channels_last_problem(model, image_size, batch_size)
    if problem is not None:
        warnings.warn(f"channels_last=True ignored: {problem}; training continues in the contiguous layout")
        return False
    return True
