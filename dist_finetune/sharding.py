"""Sharded parameters (FSDP2's ``fully_shard``): whole tensors to save, shards again to load.

Under FSDP2 every rank holds one slice of each parameter, and of its optimizer state, as a DTensor.
Model files and training-state checkpoints hold whole tensors, so they load anywhere (one GPU, DDP,
another process count). Gathering a DTensor is a collective: every rank calls the gathering
functions together, then the main process writes. Loading is local: every rank reads the whole
tensor and keeps its own slice. Plain tensors pass through unchanged, so DDP and single-process
runs take the same code path.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather, on every rank, for a DTensor; ``tensor`` itself otherwise)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: its shard for a DTensor (no communication), ``tensor`` itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor whole and detached (collective: every rank calls it)."""
    return {name: full_tensor(tensor.detach()) for name, tensor in state.items()}


def sharded_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters by name, as FSDP2 holds them between steps: a module not resharded after its
    forward (``reshard_after_forward=False``) is resharded first, so no whole parameter is handed out."""
    from torch.distributed.fsdp import FSDPModule

    for part in module.modules():
        if isinstance(part, FSDPModule):
            part.reshard()
    return dict(module.named_parameters())


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole) as ``like`` holds it: this rank's slice when ``like`` is a DTensor (no communication)."""
    if not isinstance(like, DTensor):
        return tensor
    tensor = tensor.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)


def shard_state_dict(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole ``state`` sharded as the module state ``like`` (the module's own ``state_dict()``)."""
    return {name: shard_like(tensor, like[name]) if name in like else tensor for name, tensor in state.items()}


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer ``state_dict`` with each per-parameter tensor (moments) sharded as its parameter.

    Scalars such as Adam's ``step`` stay as they are (FSDP2 keeps them as plain tensors too).
    """
    params = {index: param for saved, group in zip(state["param_groups"], optimizer.param_groups)
              for index, param in zip(saved["params"], group["params"])}
    per_param = {}
    for index, values in state["state"].items():
        param = params.get(index)
        per_param[index] = {key: shard_like(value, param)
                            if param is not None and isinstance(value, torch.Tensor) and value.shape == param.shape
                            else value for key, value in values.items()}
    return {**state, "state": per_param}
