"""Listing an image folder (``<folder>/<class>/**``) once per job: a fast walk, then an index that
every later listing (the other ranks of the job, the next run, a requeue) reads instead of walking.

The index is keyed by the folder's state: every folder of the tree with its mtime, ctime and inode.
Adding, removing or renaming a file or a folder changes its parent folder's stamps, so the index no
longer matches and the folder is listed again; it is never read stale. (Editing or touching a file
changes no listing; the image scan notices it by the file's own size and mtime.) An index is not
written while the folder is still changing (a folder stamped within ``SETTLE_NS`` of the listing:
file systems with coarse timestamps could hide a change made in the same second), nor for a folder
holding symlinked files (their targets can change without any folder noticing). Processes listing
the same folder at once wait for the first (a lock next to the index) and then read its index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .errors import DataError
from .images import IMAGE_EXTENSIONS, cache_lock, walk_image_files

INDEX_VERSION = 1
SETTLE_NS = 2_000_000_000  # folders changed this recently are listed but not indexed


def index_file(folder: str) -> Path:
    """Where the index of ``folder`` (an absolute path) lives: outside the data, which may be read-only."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_finetune" / "listings"
    return base / (hashlib.sha1(folder.encode()).hexdigest()[:16] + ".json")


def _stamp(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _read_index(path: Path, root: str) -> dict | None:
    """The index at ``path`` if it describes ``root`` as it is now, else None."""
    try:
        index = json.loads(path.read_text())
        if index.get("version") != INDEX_VERSION or index.get("root") != root:
            return None
        if not changed_folders(root, index["folders"]):
            return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _list(root: str, role: str, folder: str) -> tuple[dict, bool]:
    """The index of ``root`` walked now, and whether it may be stored (see the module docstring)."""
    started = time.time_ns()
    if not os.path.isdir(root):
        raise DataError(f"{role} folder {folder} does not exist (expected {role}/<class>/<image files>)")
    with os.scandir(root) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{role} folder {folder} has no class subfolders: put images in {folder}/<class_name>/")
    labeled, folders, symlinked = [], {"": _stamp(root)}, False
    for label, name in enumerate(classes):
        files, subfolders, has_links = walk_image_files(os.path.join(root, name))
        if not files:
            raise DataError(f"class folder {Path(folder) / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
        symlinked = symlinked or has_links
        labeled += [(f"{name}{os.sep}{file}", label) for file in files]
        folders.update({f"{name}{os.sep}{sub}": _stamp(os.path.join(root, name, sub)) for sub in subfolders})
    labeled.sort()
    index = {"version": INDEX_VERSION, "root": root, "classes": classes, "folders": folders,
             "paths": [path for path, _ in labeled], "labels": [label for _, label in labeled]}
    settled = all(max(stamp[0], stamp[1]) < started - SETTLE_NS for stamp in folders.values())
    return index, settled and not symlinked


def _indexed(folder: str, role: str) -> dict:
    """The index of ``folder``: read when it is current, else listed now (and stored if it may be)."""
    root = os.path.abspath(folder)
    cache = index_file(root)
    with cache_lock(cache):
        index = _read_index(cache, root)
        if index is None:
            index, storable = _list(root, role, folder)
            if storable:
                temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                temporary.write_text(json.dumps(index))
                os.replace(temporary, cache)
    return index


def list_class_folder(folder: str, role: str) -> tuple[list[str], list[int], list[str]]:
    """Absolute paths (sorted), integer labels and class names (the sorted subfolders) of ``folder/<class>/**``;
    from the folder's index when it is current (see the module docstring)."""
    index = _indexed(folder, role)
    root = index["root"]
    prefix = root + os.sep if root != os.sep else root
    return [prefix + path for path in index["paths"]], index["labels"], index["classes"]


def folder_state(folder: str, role: str) -> dict[str, list[int]]:
    """{folder of the tree: its stamp}: what :func:`changed_folders` compares later."""
    return _indexed(folder, role)["folders"]


def changed_folders(folder: str, state: dict[str, list[int]]) -> list[str]:
    """The folders of ``state`` (from :func:`folder_state`) whose contents changed since, or that are gone."""
    changed = []
    for relative, stamp in state.items():
        try:
            same = _stamp(os.path.join(folder, relative)) == stamp
        except OSError:
            same = False
        if not same:
            changed.append(os.path.join(folder, relative))
    return changed
