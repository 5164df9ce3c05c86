"""Training-state checkpoints: exact resume after a kill, a preemption, or a requeue.

A checkpoint is a folder ``output_dir/checkpoints/step-XXXXXXXX`` holding the model, the optimizer
(tensors as safetensors, structure as JSON), the schedule, the GradScaler, the position in the
epoch's sample order, each rank's RNG states, and a manifest of every file's size and SHA-256.
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
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .callbacks import Callback, Position, RunState
from .errors import CheckpointError
from .sharding import full_state_dict, full_tensor, shard_optimizer_state

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"


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


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer ``state_dict`` -> (whole tensors, JSON-able structure); every rank calls it (sharded state
    is gathered). Tensors stay where they are: only the process that writes them copies them to the host."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = full_tensor(value.detach())
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


def write_training_state(accelerator, output_dir: Path, model_state: dict, optimizer, schedule, position: Position,
                        signature: dict, keep_last: int, callback_states: dict) -> Path:
    """Write one checkpoint (every rank takes part: each saves its own RNG and gathers sharded tensors)
    and prune old ones."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{position.global_step:08d}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".step-*.partial"):  # writes a crash never finished
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_extra = capture_rng(accelerator.device)
    save_file(rng_tensors, partial / f"rng_rank{accelerator.process_index}.safetensors",
              metadata={"extra": json.dumps(rng_extra)})
    model_tensors = full_state_dict(model_state)
    optimizer_tensors, optimizer_structure = split_optimizer_state(optimizer.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.cpu().contiguous() for k, v in model_tensors.items()}, partial / "model.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in optimizer_tensors.items()}, partial / "optimizer.safetensors")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        _write_json(partial / "state.json", {
            "position": asdict(position), "optimizer": optimizer_structure, "schedule": schedule.state_dict(),
            "scaler": scaler, "signature": signature, "num_processes": accelerator.num_processes,
            "callbacks": callback_states,
        })
        files = sorted(p for p in partial.iterdir() if p.is_file())
        _write_json(partial / MANIFEST, {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files})
        for path in partial.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # left by an earlier run that did not resume from it (it failed verification)
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _prune(root: Path, keep_last: int) -> None:
    for old in _checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


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
    candidates = _checkpoints(root)
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


def load_training_state(checkpoint: Path, rank: int) -> dict:
    """Everything a checkpoint holds, this rank's RNG included (None when saved with fewer ranks)."""
    state = json.loads((checkpoint / "state.json").read_text())
    state["position"] = Position(**state["position"])
    state["model"] = load_file(checkpoint / "model.safetensors")
    state["optimizer"] = join_optimizer_state(load_file(checkpoint / "optimizer.safetensors"), state["optimizer"])
    rng_path = checkpoint / f"rng_rank{rank}.safetensors"
    state["rng"] = None
    if rng_path.is_file():
        with safe_open(str(rng_path), framework="pt") as handle:
            extra = json.loads(handle.metadata()["extra"])
        state["rng"] = (load_file(rng_path), extra)
    return state


def run_signature(task, data, strategy) -> dict:
    """What must not change between a checkpoint and the run that resumes it (JSON-able)."""
    return json.loads(json.dumps({
        "backbone": task.backbone_name, "classes": list(data.classes), "image_size": data.image_size,
        "head": [task.head_hidden, task.head_dropout], "strategy": strategy.describe(), "data": data.signature(),
    }))


def check_signature(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume into another backbone, class set, image size or strategy."""
    strategy = saved.get("strategy")
    if isinstance(strategy, dict) and strategy.get("name") in ("FreezeUnfreeze", "UnfreezeMilestones"):
        # written before initial_denom_lr was a setting: its groups joined at lr / 10
        saved = {**saved, "strategy": {**strategy, "initial_denom_lr": strategy.get("initial_denom_lr", 10.0)}}
    different = {k: (saved.get(k), current.get(k)) for k in current if saved.get(k) != current.get(k)}
    if different:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in different.items())
        raise CheckpointError(f"cannot resume from {checkpoint}: it belongs to a different run ({details}). "
                              "Use the same settings, or another --output-dir for a new run.")


def checkpoint_to_resume(resume: str | None, output_dir: str | None) -> Path | None:
    """The checkpoint a run starts from; refuses to start afresh over another run's checkpoints."""
    if resume is None:
        if output_dir and _checkpoints(Path(output_dir) / CHECKPOINTS_DIR):
            raise CheckpointError(
                f"output dir {output_dir} already holds checkpoints of a run: continue it with "
                "resume='latest' (--resume latest) or choose another output_dir"
            )
        return None
    return find_checkpoint(resume, output_dir)


def restore_training_state(accelerator, saved: dict, optimizer, schedule, batch_size: int,
                           checkpoint: Path) -> Position:
    """Load optimizer, schedule, scaler and RNG; map the epoch position onto this process count."""
    position = saved["position"]
    optimizer.load_state_dict(shard_optimizer_state(saved["optimizer"], optimizer))
    schedule.load_state_dict(saved["schedule"])
    if accelerator.scaler is not None and saved["scaler"]:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if saved["num_processes"] != accelerator.num_processes:
        global_batch = batch_size * accelerator.num_processes
        if position.samples_done % global_batch:
            raise CheckpointError(
                f"{checkpoint} stopped {position.samples_done} samples into epoch {position.epoch}, not a multiple "
                f"of this run's global batch {global_batch}: resume with {saved['num_processes']} processes"
            )
        position.batch = position.samples_done // global_batch
        warnings.warn(f"resuming a {saved['num_processes']}-process checkpoint with {accelerator.num_processes} "
                      "processes: training continues correctly but not bit-identically")
    elif saved["rng"] is not None:
        restore_rng(*saved["rng"], accelerator.device)
    return position


class CheckpointCadence(Callback):
    """Saves the training state at every epoch end and every ``every_n_steps`` optimizer steps.

    A step that ends an epoch is left to the epoch-end save, which follows after validation: the
    same step is never written twice (rewriting a checkpoint in place would leave a moment in which
    it does not exist).
    """

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps

    def on_step_end(self, trainer, run: RunState) -> None:
        position = run.position
        if self.every_n_steps and position.global_step % self.every_n_steps == 0 \
                and position.batch < run.epoch_batches:
            trainer.save_training_state(run)

    def on_epoch_end(self, trainer, run: RunState, record: dict) -> None:
        trainer.save_training_state(run)
