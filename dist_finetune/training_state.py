"""Training-state checkpoints: exact resume after a kill, a preemption, or a requeue.

A checkpoint is a folder ``output_dir/checkpoints/step-XXXXXXXX`` holding the model, the optimizer
(tensors as safetensors, structure as JSON; under FSDP2 the tensors as every rank's slices, a torch
distributed checkpoint in ``optimizer/``), the schedule, the GradScaler, the position in the
epoch's sample order, the batch layout and optimizer settings it was written with (``resume``
maps or applies other ones), each rank's RNG states, the callbacks' states (and tensors: the weight
average of ``--ema-decay``), and a manifest of every file's size and SHA-256.
It is written under a temporary name and renamed only when complete, so a crash mid-write never
leaves a folder that looks finished; a folder whose files do not match its manifest is skipped
with a warning and the newest intact one is used instead.

The strategy's layout (what is unfrozen, the param groups) is not stored as such: strategies are
functions of the epoch, so the trainer replays their hooks up to the saved epoch before loading
the optimizer state, which then finds exactly the groups it was saved with.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .callbacks import Callback, Position, RunState
from .errors import CheckpointError
from .fsdp import SHARDED_OPTIMIZER_DIR, save_sharded_tensors
from .sharding import full_state_dict, full_tensor

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
CALLBACK_TENSORS = "callbacks.safetensors"  # the callbacks' state_tensors (a weight average)


# ---------------------------------------------------------------------------- RNG states


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device whose generator this process uses (None off CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: CPU, numpy, python, and the generator of its own CUDA device only
    (a rank's file then restores on any node layout with the same process count)."""
    tensors = {"torch": torch.get_rng_state()}
    cuda_index = _cuda_index(device)
    if cuda_index is not None:
        tensors["cuda"] = torch.cuda.get_rng_state(cuda_index)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    python_version, python_state, gauss = random.getstate()
    extra = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
             "python": [python_version, list(python_state), gauss]}
    return tensors, extra


def restore_rng(tensors: dict[str, torch.Tensor], extra: dict, device: torch.device) -> None:
    """Restore what :func:`capture_rng` saved. Checkpoints written before it saved one device held
    every visible GPU's state as ``cuda0``..``cudaN``: the entry of this process's device is used when
    the machine shows as many GPUs as the checkpoint holds (the same node layout); on another layout
    the device index names another rank's generator, so none is restored and a warning says so."""
    torch.set_rng_state(tensors["torch"])
    cuda_index = _cuda_index(device)
    if cuda_index is not None:
        saved_gpus = sum(key.startswith("cuda") and key != "cuda" for key in tensors)
        state = tensors.get("cuda")
        if state is None and saved_gpus == torch.cuda.device_count():
            state = tensors.get(f"cuda{cuda_index}")
        if state is not None:
            torch.cuda.set_rng_state(state, cuda_index)
        elif saved_gpus:
            warnings.warn(f"the checkpoint holds no CUDA RNG state for this process's device cuda:{cuda_index} "
                          f"(it has the states of the {saved_gpus} GPU(s) its machine showed, this one shows "
                          f"{torch.cuda.device_count()}): its CUDA random numbers do not continue the saved "
                          "run's, so this resume is not bit-exact")
    kind, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = extra["python"]
    random.setstate((version, tuple(state), gauss))


# ------------------------------------------------------------------------- optimizer state


def split_optimizer_state(state: dict, gather: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer ``state_dict`` -> (tensors, JSON-able structure); with ``gather`` every rank calls it (sharded
    state is gathered whole), without it sharded tensors stay this rank's slices. Tensors stay where they are:
    only the process that writes them copies them to the host."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = full_tensor(value.detach()) if gather else value.detach()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *structure["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, sort_keys=True))


def layout_of(run: RunState) -> dict:
    """What an optimizer step and an epoch are in ``run``: a resume with another layout maps onto it."""
    return {"batch_size": run.data.batch_size, "num_processes": run.accelerator.num_processes,
            "gradient_accumulation_steps": run.config.gradient_accumulation_steps,
            "steps_per_epoch": run.steps_per_epoch}


def optimizer_settings(config) -> dict:
    """The optimizer hyper-parameters ``config`` (a TrainerConfig) sets: a resume applies changed ones."""
    settings = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        settings["momentum"] = config.momentum
    return settings


def write_training_state(run: RunState) -> Path:
    """Write one checkpoint of ``run`` (every rank takes part: each saves its own RNG and gathers sharded
    tensors) and prune old ones; never the one just written or the one this run resumed from."""
    accelerator, position = run.accelerator, run.position
    root = run.output_dir / CHECKPOINTS_DIR
    final = root / checkpoint_name(position.global_step)
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".step-*.partial"):  # writes a crash never finished
            shutil.rmtree(stale, ignore_errors=True)
        for aside in root.glob(".step-*.replaced"):  # a crash while a checkpoint was being replaced
            restored = root / aside.name[1:-len(".replaced")]
            if restored.exists():
                shutil.rmtree(aside)
            else:
                os.replace(aside, restored)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_extra = capture_rng(accelerator.device)
    save_file(rng_tensors, partial / f"rng_rank{accelerator.process_index}.safetensors",
              metadata={"extra": json.dumps(rng_extra)})
    model_tensors = full_state_dict(run.task.state_dict())
    callback_tensors = run.callbacks.state_tensors()
    sharded = run.sharded  # FSDP2: each rank writes its optimizer slices, none gathers them
    optimizer_tensors, optimizer_structure = split_optimizer_state(run.optimizer.state_dict(), gather=not sharded)
    if sharded:
        save_sharded_tensors(optimizer_tensors, partial / SHARDED_OPTIMIZER_DIR)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.cpu().contiguous() for k, v in model_tensors.items()}, partial / "model.safetensors")
        if not sharded:
            save_file({k: v.cpu().contiguous() for k, v in optimizer_tensors.items()},
                      partial / "optimizer.safetensors")
        if callback_tensors:
            save_file({k: v.cpu().contiguous() for k, v in callback_tensors.items()}, partial / CALLBACK_TENSORS)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        _write_json(partial / "state.json", {
            "position": asdict(position), "optimizer": optimizer_structure, "schedule": run.schedule.state_dict(),
            "scaler": scaler, "signature": run.signature, "num_processes": accelerator.num_processes,
            "layout": layout_of(run), "optimizer_settings": optimizer_settings(run.config),
            "callbacks": run.callbacks.state_dict(),
        })
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        _write_json(partial / MANIFEST, {p.relative_to(partial).as_posix(): {"size": p.stat().st_size,
                                                                             "sha256": _sha256(p)} for p in files})
        for path in [*files, partial / MANIFEST]:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        # the same step again: a preemption saved at an epoch's last step, and the resumed run's epoch-end
        # save is at that step too; the old folder (perhaps the one resumed from) goes only once the new is in
        aside = root / f".{final.name}.replaced"
        if final.exists():
            os.replace(final, aside)
        os.replace(partial, final)
        shutil.rmtree(aside, ignore_errors=True)
        kept = {final.resolve(), *([run.resumed_from.resolve()] if run.resumed_from else [])}
        for old in step_checkpoints(root)[:-run.config.keep_last]:
            if old.resolve() not in kept:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_name(global_step: int) -> str:
    """``step-XXXXXXXX``: names sort as the steps do."""
    return f"step-{global_step:08d}"


def step_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders directly in ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


# ------------------------------------------------------------------------------ reading


def verify(checkpoint: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is there, whole and unchanged."""
    manifest_path = checkpoint / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: no readable {MANIFEST} ({error})") from error
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {checkpoint} is corrupt: {name} is missing, truncated or altered")


def find_checkpoint(resume: str, output_dir: str | None) -> Path | None:
    """The checkpoint to resume from: a given folder, or the newest intact one for "latest".

    "latest" with no checkpoint at all is a fresh start (None); with checkpoints that are all corrupt
    it is an error, so a requeued job never silently starts over.
    """
    if resume != "latest":
        path = Path(resume)
        verify(path)
        return path
    if not output_dir:
        raise CheckpointError("resume='latest' needs an output_dir (--output-dir) to look for checkpoints in")
    root = Path(output_dir) / CHECKPOINTS_DIR
    candidates = step_checkpoints(root)
    for candidate in reversed(candidates):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as error:
            warnings.warn(f"{error}; falling back to an older checkpoint")
    if candidates:
        raise CheckpointError(
            f"every checkpoint in {root} is corrupt or incomplete ({', '.join(c.name for c in candidates)}): "
            "refusing to start over silently. To start a new run on purpose, move or delete that folder "
            "(or choose another --output-dir); to resume from a specific one, pass --resume PATH."
        )
    return None


@dataclass
class TrainingState:
    """What a checkpoint holds, as one rank loads it. The fields are state.json's keys (plus the tensors
    and this rank's RNG); keys an older checkpoint lacks are None."""

    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict  # the optimizer's state_dict, tensors joined back in
    schedule: dict  # WarmupSchedule.state_dict()
    scaler: dict | None  # the GradScaler's (fp16 on a GPU)
    signature: dict  # run_signature.run_signature() of the run that wrote it
    num_processes: int
    layout: dict | None = None  # layout_of(); recorded since a resume maps another batch layout
    optimizer_settings: dict | None = None  # optimizer_settings(); recorded since a resume applies changed ones
    callbacks: dict = field(default_factory=dict)  # CallbackList.state_dict()
    callback_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # CallbackList.state_tensors()
    rng: tuple[dict[str, torch.Tensor], dict] | None = None  # capture_rng() of this rank; None: saved by fewer ranks
    sharded_optimizer: Path | None = None  # FSDP2: the optimizer's slices (a torch distributed checkpoint folder)


def load_training_state(checkpoint: Path, rank: int) -> TrainingState:
    """Everything a checkpoint holds, this rank's RNG included."""
    state = json.loads((checkpoint / "state.json").read_text())
    rng, rng_path = None, checkpoint / f"rng_rank{rank}.safetensors"
    if rng_path.is_file():
        with safe_open(str(rng_path), framework="pt") as handle:
            rng = (load_file(rng_path), json.loads(handle.metadata()["extra"]))
    sharded = checkpoint / SHARDED_OPTIMIZER_DIR  # read into this run's slices by resume (fsdp.py)
    whole = {} if sharded.is_dir() else load_file(checkpoint / "optimizer.safetensors")
    known = {f.name for f in fields(TrainingState)}
    callback_tensors = checkpoint / CALLBACK_TENSORS
    return TrainingState(**{**{k: v for k, v in state.items() if k in known},
                            "position": Position(**state["position"]),
                            "model": load_file(checkpoint / "model.safetensors"),
                            "optimizer": join_optimizer_state(whole, state["optimizer"]),
                            "callbacks": state.get("callbacks") or {}, "rng": rng,
                            "callback_tensors": load_file(callback_tensors) if callback_tensors.is_file() else {},
                            "sharded_optimizer": sharded if sharded.is_dir() else None})


def checkpoint_to_resume(resume: str | None, output_dir: str | None) -> Path | None:
    """The checkpoint a run starts from; refuses to start afresh over another run's checkpoints."""
    if resume is None:
        if output_dir and step_checkpoints(Path(output_dir) / CHECKPOINTS_DIR):
            raise CheckpointError(
                f"output dir {output_dir} already holds checkpoints of a run: continue it with "
                "resume='latest' (--resume latest) or choose another output_dir"
            )
        return None
    return find_checkpoint(resume, output_dir)


def set_aside_newer(root: Path, checkpoint: Path, global_step: int) -> tuple[list[str], Path] | None:
    """Move the checkpoints in ``root`` at or after ``global_step`` (other than ``checkpoint``) into a new
    ``abandoned-<UTC time>`` folder there; returns their names and the folder, or None if there were none."""
    newer = [path for path in step_checkpoints(root)
             if path.name >= checkpoint_name(global_step) and path.resolve() != checkpoint.resolve()]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder, attempt = root / f"abandoned-{stamp}", 1
    while folder.exists():
        attempt += 1
        folder = root / f"abandoned-{stamp}-{attempt}"
    folder.mkdir()
    for path in newer:
        os.replace(path, folder / path.name)
    return [path.name for path in newer], folder


class CheckpointCadence(Callback):
    """Saves the training state at every epoch end and every ``every_n_steps`` optimizer steps.

    When a run resumes from a checkpoint that is not the newest, the newer ones belong to the
    continuation it replaces: they are moved to ``checkpoints/abandoned-<UTC time>/`` (nothing is
    deleted) as training starts (not in a dry run), so ``--resume latest`` never returns to them.

    A step that ends an epoch is left to the epoch-end save, which follows after validation, so the
    cadence never writes one step twice. A preemption at an epoch's last step can: the resumed run's
    epoch-end save is at the same step, and replaces that folder without a moment in which none exists.
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps

    def on_fit_start(self, trainer, run: RunState) -> None:
        if run.resumed_from is not None and run.output_dir is not None and run.is_main_process:
            moved = set_aside_newer(run.output_dir / CHECKPOINTS_DIR, run.resumed_from, run.position.global_step)
            if moved:
                names, folder = moved
                trainer.announce(f"{', '.join(names)}: as new as or newer than {run.resumed_from.name}, from a "
                                 f"continuation this run replaces; moved to {folder}")

    def on_step_end(self, trainer, run: RunState) -> None:
        position = run.position
        if self.every_n_steps and position.global_step % self.every_n_steps == 0 \
                and position.batch < run.epoch_batches:
            trainer.save_training_state(run)

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        trainer.save_training_state(run)
