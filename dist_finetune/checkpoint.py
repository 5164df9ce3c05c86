"""Model files: safetensors weights with the run's metadata in the header, written atomically.

The header carries everything needed to rebuild the model and its preprocessing (backbone name,
classes, image size, normalisation, head shape, library version), so a checkpoint is one file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

METADATA_KEY = "dist_finetune"
FORMAT_VERSION = 1


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``state_dict`` (made contiguous, on CPU) and JSON ``metadata`` to one safetensors file."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    header = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **metadata}, sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=header)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The run metadata of a checkpoint written by :func:`save_model`."""
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from error
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} has no dist_finetune metadata: it is not a model saved by dist_finetune "
            "(to start from plain backbone weights, pass it as weights=... / --weights)"
        )
    return json.loads(header[METADATA_KEY])


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a checkpoint written by :func:`save_model`."""
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read tensors from {path} ({error}); the file may be corrupt") from error
    return tensors, metadata


def check_state_dict_matches(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the keys that are missing, unexpected, or of another shape."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(loaded[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(loaded)
        if loaded[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [f"{label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape)) if keys]
        raise CheckpointError(f"{source} does not match this model ({'; '.join(parts)}); "
                              "it was saved from a different backbone or head")


def _check_exists(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
