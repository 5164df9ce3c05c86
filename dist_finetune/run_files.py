"""Reading and writing the run folder's own files, safe against kills and torn lines.

A leaf module (no torch, nothing from ``dist_finetune``), so the plotting command can read a run
that is still going without importing the training stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename over it (atomic on POSIX); the umask sets permissions."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it is missing).

    A line that is not a JSON object is skipped: a kill mid-write leaves a torn last line, and a
    run that is still going may be appending one right now.
    """
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
