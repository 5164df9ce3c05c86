"""Distributed helpers: a correctly configured Accelerator, DDP that follows unfreezing, rank checks,
and every collective the package uses (on accelerate's public operations).

What is synchronised, and when:
- Trainable parameters: gradients are all-reduced by DDP every optimizer step. DDP fixes the set of
  parameters it reduces when it is built, so after a strategy changes ``requires_grad`` the wrapper
  is rebuilt over the same module (:class:`DDPResync`); the optimizer keeps the same Parameters.
  Under FSDP2 (``fsdp.py``) there is no wrapper: the sharded task reduce-scatters what got a gradient.
- BatchNorm running statistics: DDP broadcasts rank 0's buffers at every forward
  (``broadcast_buffers=True``); after each forward other ranks' buffers drift, so the trainer
  broadcasts them again before every validation (:func:`broadcast_buffers`): all ranks validate
  and save the same model. ``sync_batchnorm`` (GPU only)
  instead computes batch statistics across ranks.
- Consistency: :func:`check_rank_consistency` compares bit-exact checksums of every trainable
  parameter (a sharded one: its layout) and the optimizer's group layout across ranks after each
  transition and at the end.
- Waiting: every collective gives up after the process group's timeout (``process_group_timeout_s``,
  30 min by default instead of NCCL's 10), so long one-off work is split over all ranks
  (:func:`split_over_ranks`) rather than done by one while the others wait in a barrier.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import math
import os
import warnings
from datetime import timedelta
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DynamoBackend,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast,
    broadcast_object_list,
    gather,
    gather_object,
    parse_choice_from_env,
    parse_flag_from_env,
)
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, DistributedSetupError, RankMismatchError
from .fsdp import runner_applies_fsdp2

DEFAULT_PROCESS_GROUP_TIMEOUT_S = 1800.0  # NCCL's own default, 10 min, is shorter than a cold image scan can be


def shutdown() -> None:
    """Leave the process group, if one was joined, and end its threads while Python is still whole.

    ``destroy_process_group`` only unregisters a gloo group (gloo has no shutdown): its two worker
    threads and its transport loop run until the C++ group is freed. A DDP wrapper holds the group,
    and wrappers sit in reference cycles (accelerate's patched ``forward``), so without a collection
    here the group lived on into the interpreter's final garbage collection and its threads were
    stopped during finalisation, where a rank now and then aborted after a successful run
    ("terminate called without an active exception", SIGABRT). The trainer drops its wrappers when
    a run ends (:func:`release_wrappers`); collecting here frees the group and joins its threads.
    """
    if torch.distributed.is_initialized():
        AcceleratorState().destroy_process_group()
    gc.collect()


def release_wrappers(accelerator: Accelerator) -> None:
    """Forget the DDP wrappers, optimizers and loaders accelerate tracks, once a run is over (each
    wrapper holds the process group; see :func:`shutdown`)."""
    accelerator.free_memory()


_shutdown_at_exit = False


def _leave_the_process_group_at_exit() -> None:
    """A process that exits with its gloo group alive aborts now and then ("terminate called without an
    active exception", exit -6) after everything it did succeeded: leave the group at exit, whatever
    the script does (the CLI already calls :func:`shutdown`; Python scripts often do not)."""
    global _shutdown_at_exit
    if not _shutdown_at_exit:
        atexit.register(shutdown)
        _shutdown_at_exit = True


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size(accelerator: Accelerator | None = None) -> int:
    """Processes on this machine, which share its CPU cores and GPUs: the launcher's LOCAL_WORLD_SIZE (set by
    accelerate launch and torchrun); else all of ``accelerator``'s, or 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes if accelerator is not None else 1))


def check_gpus_per_machine(use_cpu: bool = False) -> None:
    """One GPU per local process, checked before accelerate's bare "invalid device ordinal" (``use_cpu`` or
    ACCELERATE_USE_CPU: CPU processes, any number)."""
    if use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        return
    local, visible = local_world_size(), torch.cuda.device_count()
    if local > visible:
        raise ConfigError(
            f"{local} processes per machine (LOCAL_WORLD_SIZE) but this machine shows {visible} GPU(s): each "
            f"process needs its own GPU. Launch {visible} process(es) per machine (accelerate launch "
            "--num_processes / torchrun --nproc_per_node; on SLURM GPUS_PER_NODE or --gres=gpu:N) or make more "
            "GPUs visible (CUDA_VISIBLE_DEVICES)."
        )


def slurm_cpu_warning() -> str | None:
    """Why this SLURM allocation starves the data loaders, or None: fewer CPUs than processes on the node
    (a job that asks for one CPU per node runs every rank on one core, with no loader workers)."""
    cpus, local = os.environ.get("SLURM_CPUS_ON_NODE", ""), local_world_size()
    if not cpus.isdigit() or int(cpus) >= local:
        return None
    return (f"SLURM gave this node {cpus} CPU(s) for {local} processes: they share cores and their data loaders "
            "get no workers, so the GPUs wait for images. Request CPUs for every process: `#SBATCH "
            f"--cpus-per-task=N` in the batch script (or `sbatch --cpus-per-task=N`), N = {local} x (1 + loader "
            "workers per process), e.g. 8 per GPU.")


def make_accelerator(mixed_precision: str | None = None, gradient_accumulation_steps: int = 1,
                     log_with: list[str] | None = None, project_dir: str | None = None,
                     process_group_timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S) -> Accelerator:
    """An Accelerator that never trains as N independent rank-0s.

    Launched with WORLD_SIZE > 1 on a machine without a GPU, the CPU (gloo) backend is selected here,
    so ``torchrun`` or ``accelerate launch --multi_gpu`` work on CPU nodes without extra flags.
    ``log_with``: experiment trackers (accelerate's names), writing under ``project_dir``.
    ``process_group_timeout_s``: how long any collective waits for the slowest rank before the job fails.
    """
    world_size = launched_world_size()
    use_cpu = world_size > 1 and not torch.cuda.is_available()
    check_gpus_per_machine(use_cpu)
    if AcceleratorState._shared_state:
        # a second Trainer in the same process may ask for another precision
        AcceleratorState._reset_state()
    try:
        with runner_applies_fsdp2():  # the runner shards with FSDP2 itself (fsdp.py)
            accelerator = Accelerator(
                cpu=use_cpu,
                mixed_precision=mixed_precision,
                gradient_accumulation_steps=gradient_accumulation_steps,
                kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True),
                                 InitProcessGroupKwargs(timeout=timedelta(seconds=process_group_timeout_s))],
                dynamo_backend="no",  # the trainer compiles itself (see launcher_compile_settings)
                dataloader_config=DataLoaderConfiguration(non_blocking=True),  # async copies from pinned batches
                log_with=log_with or None,
                project_config=ProjectConfiguration(project_dir=project_dir) if project_dir else None,
            )
    except ValueError as error:  # accelerate refuses a world without a rendezvous address
        if world_size == 1 or "MASTER_ADDR" not in str(error):
            raise
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} is set but MASTER_ADDR is not: this process cannot find the other "
            f"{world_size - 1} process(es). Start every process with `accelerate launch --multi_gpu "
            "--num_processes N` or torchrun (they set the rendezvous variables), or unset WORLD_SIZE to train "
            "in one process."
        ) from error
    if accelerator.num_processes > 1:
        _leave_the_process_group_at_exit()
    if accelerator.num_processes != world_size:
        raise DistributedSetupError(
            f"launched with WORLD_SIZE={world_size} but this process sees {accelerator.num_processes} "
            "process(es): each rank would train alone on all the data. On CPU launch with "
            "`accelerate launch --multi_gpu --num_processes N` or torchrun plus ACCELERATE_USE_CPU=1; "
            "on GPU check that every process sees a GPU (CUDA_VISIBLE_DEVICES)."
        )
    starved = slurm_cpu_warning()
    if starved and accelerator.is_main_process:
        warnings.warn(starved, stacklevel=2)
    return accelerator


def launcher_mixed_precision() -> str:
    """The mixed precision `accelerate launch` asks for (its flag or config file), as an Accelerator would use it."""
    return parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")


def launcher_compile_settings() -> tuple[str, str | None] | None:
    """(backend, mode) when the accelerate launch config asks for torch.compile (``dynamo_backend``).

    Accelerate would compile the DDP wrapper inside ``prepare``, out of reach of the DDP rebuild
    that unfreezing needs; the trainer takes the request over and compiles the wrapper itself.
    """
    plugin = TorchDynamoPlugin()  # reads ACCELERATE_DYNAMO_* as set by `accelerate launch`
    if plugin.backend == DynamoBackend.NO:
        return None
    return plugin.backend.value.lower(), None if plugin.mode == "default" else plugin.mode


def _trainable_signature(module: nn.Module) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(module.parameters()) if p.requires_grad)


class DDPResync:
    """Rebuild the DDP wrapper whenever the set of trainable parameters changes."""

    def __init__(self, accelerator: Accelerator, wrapped: nn.Module):
        self.accelerator = accelerator
        self.wrapped = wrapped
        self.signature = _trainable_signature(accelerator.unwrap_model(wrapped))

    def changed(self) -> bool:
        """Whether ``requires_grad`` changed since the wrapper was (re)built."""
        return _trainable_signature(self.accelerator.unwrap_model(self.wrapped)) != self.signature

    def __call__(self) -> nn.Module:
        """The wrapper to train with now: the same one, or a new DDP over the same module.

        Building DDP broadcasts rank 0's parameters and buffers, so run rank checks before this.
        """
        inner = self.accelerator.unwrap_model(self.wrapped)
        signature = _trainable_signature(inner)
        if signature == self.signature or not isinstance(self.wrapped, DistributedDataParallel):
            self.signature = signature
            return self.wrapped
        old = self.wrapped
        kwargs = self.accelerator.ddp_handler.to_kwargs() if self.accelerator.ddp_handler else {}
        device_ids = getattr(old, "device_ids", None)
        if isinstance(old, DistributedDataParallel) and device_ids:
            kwargs.update(device_ids=device_ids, output_device=old.output_device)
        new = DistributedDataParallel(inner, **kwargs)  # broadcasts rank 0's state, re-registers hooks
        models = self.accelerator._models  # accelerate's own list; replace in place, never track twice
        for index, model in enumerate(models):
            if model is old:
                models[index] = new
        self.wrapped, self.signature = new, signature
        return new


def _bit_checksum(tensor: torch.Tensor) -> int:
    """An integer fingerprint of the exact bits (position-weighted, so permutations differ too)."""
    flat = tensor.detach().contiguous().view(-1)
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(int_type).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521 + 1
    return int((bits * weights).sum().item())


def _parameter_fingerprint(param: torch.Tensor) -> int | str:
    """The bits of a replicated parameter; for a sharded one (FSDP2) its layout. Each shard has one owner,
    so the whole parameter gathered on every rank is the same by construction: comparing it would cost an
    all-gather and could never differ. What can differ is where a rank believes the slices are."""
    if isinstance(param, DTensor):
        return f"sharded {tuple(param.shape)} {param.placements} over {param.device_mesh.size()}"
    return _bit_checksum(param)


def rank_fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer,
                     averaged: dict[str, torch.Tensor] | None = None) -> dict:
    """Checksums of the trainable parameters (a sharded one: its layout, see :func:`_parameter_fingerprint`),
    the optimizer's group layout, and of ``averaged`` (the weight average, by parameter name) if given."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [(n, _parameter_fingerprint(p)) for n, p in model.named_parameters() if p.requires_grad]
    layout = [
        (tuple(names.get(id(p), "?") for p in group["params"]), float(group["lr"]))
        for group in optimizer.param_groups
    ]
    return {"params": params, "layout": layout,
            "averaged": [(n, _parameter_fingerprint(t)) for n, t in (averaged or {}).items()]}


def _describe_difference(reference: dict, other: dict) -> str:
    if [n for n, _ in reference["params"]] != [n for n, _ in other["params"]]:
        ours, theirs = {n for n, _ in reference["params"]}, {n for n, _ in other["params"]}
        return f"different trainable parameters (only on rank 0: {sorted(ours - theirs)[:3]}, " \
               f"only here: {sorted(theirs - ours)[:3]})"
    for (name, a), (_, b) in zip(reference["params"], other["params"]):
        if a != b:
            return f"first differing parameter {name!r}"
    for index, (a, b) in enumerate(zip(reference["layout"], other["layout"])):
        if a != b:
            return f"optimizer param group {index} differs ({len(a[0])} params lr={a[1]} vs {len(b[0])} lr={b[1]})"
    if reference["layout"] == other["layout"]:
        different = [a[0] for a, b in zip(reference["averaged"], other["averaged"]) if a != b]
        return f"first differing weight average {different[0]!r}" if different else "the weight averages differ"
    return f"optimizer has {len(reference['layout'])} param groups on rank 0 but {len(other['layout'])} here"


def check_rank_consistency(accelerator: Accelerator, model: nn.Module, optimizer, when: str,
                           averaged: dict[str, torch.Tensor] | None = None) -> None:
    """Raise on every rank if any rank's trainable parameters, param groups or weight average (``averaged``)
    differ from rank 0's."""
    if accelerator.num_processes == 1:
        return
    gathered = gather_object([rank_fingerprint(accelerator.unwrap_model(model), optimizer, averaged)])
    for rank, other in enumerate(gathered[1:], start=1):
        if other != gathered[0]:
            raise RankMismatchError(
                f"rank consistency check failed {when}: rank {rank} differs from rank 0 - "
                f"{_describe_difference(gathered[0], other)}. The ranks no longer train one model; "
                "a strategy or callback changed state on some ranks only (turn the check off with "
                "check_rank_consistency=False only to debug)."
            )


def broadcast_buffers(accelerator: Accelerator, model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        broadcast(buffer.data, from_process=0)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce): decisions all ranks share."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def from_main_process(accelerator: Accelerator, value):
    """Rank 0's ``value`` on every rank (a picklable object): one process reads a file, all agree."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def same_on_every_rank(accelerator: Accelerator, value):
    """Rank 0's ``value`` (JSON-able) on every rank: what each process decided alone before the ranks met
    (a seeded split by content hashes, which a read error on one rank changes) becomes one decision. Costs
    one all-gather of a hash; the value itself is sent only when some rank holds another."""
    if accelerator.num_processes == 1:
        return value
    digest = hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()
    if len(set(gather_object([digest]))) == 1:
        return value
    return from_main_process(accelerator, value)


def merged_over_ranks(accelerator: Accelerator, mine: dict) -> dict:
    """Every rank's dict merged, the same on every rank (one all-gather)."""
    if accelerator.num_processes == 1:
        return dict(mine)
    merged: dict = {}
    for part in gather_object([mine]):
        merged.update(part)
    return merged


def split_over_ranks(accelerator: Accelerator, items: Sequence, work: Callable[[list], dict]) -> dict:
    """``work`` over ``items`` split among the ranks (each takes every Nth item), its results merged on every
    rank (one all-gather): all ranks work at once, none waits past the process group's timeout for one that
    works alone, and every rank then decides from the same results."""
    return merged_over_ranks(accelerator, work(list(items[accelerator.process_index::accelerator.num_processes])))


GATHER_CHUNK_BYTES = 64 << 20  # what one rank contributes to one collective of gather_rows


def gather_rows(accelerator: Accelerator, rows: torch.Tensor, out: list[torch.Tensor],
                chunk_bytes: int = GATHER_CHUNK_BYTES) -> None:
    """Fill ``out[r]`` with rank r's ``rows`` on every rank: ``out`` holds one host tensor per rank with
    that rank's row count (views of one preallocated tensor, so the result is never copied again).

    Gathered a chunk of rows at a time on the collective's device (NCCL needs the GPU), each chunk
    copied into ``out`` and freed: the device holds at most (world size + 1) x ``chunk_bytes``, never
    the whole result.
    """
    counts = [block.shape[0] for block in out]
    if rows.shape[0] != counts[accelerator.process_index]:
        raise ValueError(f"gather_rows: rank {accelerator.process_index} has {rows.shape[0]} rows, "
                         f"out expects {counts[accelerator.process_index]}")
    if accelerator.num_processes == 1:
        out[0].copy_(rows)
        return
    chunk_rows = max(1, chunk_bytes // max(1, math.prod(rows.shape[1:]) * rows.element_size()))
    for start in range(0, max(counts), chunk_rows):
        stop = min(start + chunk_rows, max(counts))
        piece = torch.zeros((stop - start, *rows.shape[1:]), dtype=rows.dtype, device=accelerator.device)
        mine = rows[start:stop]
        piece[:len(mine)] = mine
        gathered = gather(piece)  # [world size x (stop - start), ...] on the device
        for rank, count in enumerate(counts):
            taken = max(0, min(count, stop) - start)
            offset = rank * (stop - start)
            out[rank][start:start + taken] = gathered[offset:offset + taken]
        del piece, gathered


def average_gradients(accelerator: Accelerator, module: nn.Module) -> None:
    """Average ``module``'s gradients over ranks by hand (for parameters trained outside the DDP wrapper)."""
    if accelerator.num_processes == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))
