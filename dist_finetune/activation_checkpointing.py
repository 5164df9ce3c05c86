"""Activation checkpointing per backbone layer (``activation_checkpointing=True``): less memory for big backbones.

A trainable layer's forward keeps only its input; backward runs the layer again to get what it needs.
Peak activation memory falls from every layer's intermediates to one layer's at a time, for about a
third more compute. Frozen layers need none: without a trainable parameter (and with a frozen input)
autograd saves nothing for them, so the choice is made at every forward, and an unfreeze switches a
layer over by itself. The layers are the strategies' (``backbones.layer_modules``), the same units FSDP2
shards, so under FSDP2 a recomputed layer finds its parameters gathered by the backward all-gather.

The recomputation runs with the same random state (dropout, stochastic depth) and leaves BatchNorm's
running statistics as the forward left them: the loss, the gradients and the buffers are those of a run
without checkpointing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .backbones import layer_modules

_RECOMPUTED = "_dist_finetune_recomputed"


def checkpoint_trainable_layers(task) -> int:
    """Recompute every backbone layer's modules in backward while they train; returns how many modules
    (a second call, a task finetuned again, changes nothing)."""
    modules = [module for names in task.layer_names for module in layer_modules(task.backbone, names)[0]]
    for module in modules:
        if not getattr(module, _RECOMPUTED, False):
            module.forward = _recomputed_while_trainable(module, module.forward)
            setattr(module, _RECOMPUTED, True)
    return len(modules)


def _recomputed_while_trainable(module: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=functools.partial(_contexts, module), **kwargs)

    return run


def _contexts(module: nn.Module):
    """(around the forward, around the recomputation): checkpoint's ``context_fn``."""
    return contextlib.nullcontext(), _norm_statistics_kept(module)


@contextlib.contextmanager
def _norm_statistics_kept(module: nn.Module):
    """BatchNorm in training mode updates its running statistics at every call: the recomputation would count
    each batch twice. Its buffers are put back as the forward left them."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [[buffer.clone() for buffer in norm.buffers(recurse=False)] for norm in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved):
                for buffer, value in zip(norm.buffers(recurse=False), buffers):
                    buffer.copy_(value)
