"""FSDP2 for every finetuning strategy: ``fully_shard`` per backbone layer, frozen or not.

FSDP1 flattens a unit's parameters into one tensor, so a unit could not hold frozen and trainable
parameters, nor change which it holds. FSDP2 shards every parameter on its own (a DTensor): only
parameters that got a gradient are reduce-scattered, and a ``requires_grad`` change (an unfreeze)
is honoured at the next all-gather, so the strategies run unchanged. Each backbone layer (the units
the strategies unfreeze, ``backbones.layer_modules``) is one shard unit, the task itself (head and
whatever no layer holds) another: an unfreeze never splits a unit, and a frozen layer never gets a
gradient or optimizer state (the optimizer only ever holds what trains).

Selected by ``sharding="fsdp2"`` (``--sharding fsdp2``), or by an accelerate launch config asking for
FSDP with ``fsdp_version: 2`` (launch_configs/fsdp2.yaml). Accelerate applies FSDP only on GPUs
(on CPU ranks it builds DDP), and wraps by size, not by the strategies' layers: the runner therefore
shards the task itself, with the same code on CPU ranks and GPUs, and builds its Accelerator
without accelerate's FSDP (:func:`runner_applies_fsdp2`). bf16 mixed precision is FSDP2's
``MixedPrecisionPolicy`` (parameters gathered in bf16, gradients reduced in fp32).

The optimizer state of a sharded run is checkpointed sharded as well (torch distributed
checkpoint: every rank writes its own slices, none gathers the optimizer), and loads back into
any number of processes (:func:`save_sharded_tensors`, :func:`load_sharded_tensors`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .backbones import layer_modules
from .errors import ConfigError, DistributedSetupError

SHARDINGS = ("ddp", "fsdp2")
SHARDED_OPTIMIZER_DIR = "optimizer"  # in a checkpoint folder: the optimizer state as torch distributed checkpoint
FSDP2_DOC = "docs/fsdp2.md"


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() in ("true", "1", "yes")


def launcher_fsdp_version() -> int | None:
    """The FSDP version `accelerate launch` asks for (``distributed_type: FSDP``; its ``fsdp_version``,
    1 when unset), or None without FSDP."""
    return int(os.environ.get("FSDP_VERSION", "1")) if _flag("ACCELERATE_USE_FSDP") else None


def resolve_sharding(setting: str | None, freezes: bool, accelerator=None) -> str:
    """"ddp" or "fsdp2": ``setting``, else what the launch config asks for; refuses, before any training,
    what cannot finetune with a freezing strategy (``freezes``): DeepSpeed, FSDP1. With ``accelerator``:
    also checks the type it was built as (an FSDP/DeepSpeed plugin given in code)."""
    from accelerate import DistributedType

    version = launcher_fsdp_version()
    kinds = {getattr(accelerator, "distributed_type", None)}
    if freezes and (_flag("ACCELERATE_USE_DEEPSPEED") or DistributedType.DEEPSPEED in kinds):
        raise DistributedSetupError(
            "freezing strategies are not supported under DeepSpeed: ZeRO partitions flat parameter groups "
            "fixed at prepare, so requires_grad cannot change afterwards. Shard with FSDP2 instead, which freezes "
            "and unfreezes per parameter: accelerate launch --config_file launch_configs/fsdp2.yaml (or "
            f"--sharding fsdp2 / Trainer(sharding='fsdp2')); see {FSDP2_DOC}. DeepSpeed works with 'no_freeze'.")
    if freezes and (version == 1 or DistributedType.FSDP in kinds):
        raise DistributedSetupError(
            "freezing strategies are not supported under FSDP1 (the launch config's fsdp_version is 1 or unset): "
            "its flat parameters cannot change requires_grad after prepare. Set `fsdp_version: 2` in the launch "
            f"config's fsdp_config (launch_configs/fsdp2.yaml), or use DDP; see {FSDP2_DOC}.")
    sharding = setting or ("fsdp2" if version == 2 else "ddp")
    if sharding == "fsdp2":
        check_fully_shard_available()
    return sharding


def check_fully_shard_available() -> None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"sharding 'fsdp2' needs torch.distributed.fsdp.fully_shard (torch >= 2.6); this is torch "
                          f"{torch.__version__}: upgrade torch, or use sharding 'ddp'") from error


@contextlib.contextmanager
def runner_applies_fsdp2():
    """While the Accelerator is built: a launch config's FSDP2 request hidden from accelerate, which would
    otherwise shard by size on GPUs (and not on CPU ranks) inside ``prepare``; the runner shards itself."""
    if launcher_fsdp_version() != 2:
        yield
        return
    launched_with = os.environ["ACCELERATE_USE_FSDP"]  # set: the launch config asks for FSDP2
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        os.environ["ACCELERATE_USE_FSDP"] = launched_with  # as the launcher spelled it ("true", "1", ...)


def shard_units(task) -> list[list[nn.Module]]:
    """Each backbone layer's modules (one shard unit per layer); refuses layers that cannot be units."""
    units, owner = [], {}
    for index, names in enumerate(task.layer_names):
        modules, _ = layer_modules(task.backbone, names)
        if not modules:
            raise ConfigError(
                f"backbone {task.backbone_name}: layer {index} ({', '.join(names[:3])}) has no module of its own "
                "(its parameters share modules with other layers), so FSDP2 cannot shard it as one unit the "
                "strategies freeze and unfreeze whole. Register the backbone with layer_names that name whole "
                "modules (backbones.register_backbone), or use sharding 'ddp'.")
        for module in modules:
            for param in module.parameters():
                if owner.setdefault(id(param), index) != index:
                    raise ConfigError(
                        f"backbone {task.backbone_name}: layers {owner[id(param)]} and {index} share parameters, so "
                        "FSDP2 cannot shard them per layer. Give every parameter one layer in layer_names, or use "
                        "sharding 'ddp'.")
        units.append(modules)
    return units


def mixed_precision_policy(mixed_precision: str):
    """FSDP2's policy for the run's mixed precision: bf16 gathers parameters in bf16 and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "fp16":
        raise ConfigError("sharding 'fsdp2' runs bf16 mixed precision (FSDP2's MixedPrecisionPolicy); fp16 needs a "
                          "sharded gradient scaler the runner does not have: use --mixed-precision bf16 (or no)")
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_for_training(task, accelerator) -> bool:
    """``fully_shard`` every backbone layer, then the task, over all processes on the accelerator's device
    (gloo on CPU, NCCL on GPUs); call after the strategy froze and before the optimizer is built. Returns
    whether the task is sharded (not without a process group: a plain single process has nothing to shard over)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(accelerator.mixed_precision)
    units = shard_units(task)
    if not torch.distributed.is_initialized():
        warnings.warn("sharding 'fsdp2' in a single process without a launcher: nothing to shard over, training "
                      "unsharded", stacklevel=2)
        return False
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for modules in units:
        fully_shard(modules, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(task, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return True


def prepare(accelerator, task, sharded: bool, *objects):
    """``accelerator.prepare(task, *objects)``; a sharded task is not handed over (on CPU ranks accelerate
    would wrap it in DDP, which would all-reduce what FSDP2 already reduce-scatters)."""
    if not sharded:
        return accelerator.prepare(task, *objects)
    return (task, *accelerator.prepare(*objects))


def has_sharded_tensors(tensors: dict[str, torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors.values())


def save_sharded_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every rank writes its slices of ``tensors`` (DTensors; plain ones once) into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, checkpoint_id=str(folder))


def load_sharded_tensors(folder: Path, template_for: Callable[[str], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The tensors of :func:`save_sharded_tensors`, each held as its template (``template_for(name)``, when
    of the saved shape) holds it: this rank's slice of a DTensor, at any process count (resharded on load);
    whole otherwise."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    targets = {}
    for name, entry in metadata.items():
        template = template_for(name)
        if template is not None and tuple(template.shape) == tuple(entry.size):
            targets[name] = torch.empty_like(template, dtype=entry.properties.dtype)
        else:
            targets[name] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    dcp.load(targets, checkpoint_id=str(folder))
    return targets
