"""Images: listing files, decoding any image to RGB (fast draft decode for large JPEGs), and the
up-front scan that finds every unreadable image before training, with a cache.

The scan also records each image's SHA-256, so byte-identical copies (a photo in both train and val)
can be found without reading the images again.

Items: what the scan and the datasets handle is a list of string *items* plus a *reader* that opens
one. :class:`FileImages` (the default) reads items that are file paths; a reader for images stored
inside datasets lives in ``sources``. A reader has ``open(item)`` (a path or a named binary file for
``load_rgb``), ``stamp(item)`` (what must be unchanged for a cached verdict to hold: size and mtime
of a file, the SHA-256 of stored bytes; ``stamps_are_stats``: taken in one thread, not a pool),
``check(item)`` -> (problem or None, SHA-256) and ``cache_key`` (what names its scan cache, or None for no cache).
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from operator import eq, itemgetter
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SCAN_MIN_SIDE = 32  # the scan decodes JPEGs at reduced size: every byte is still entropy-decoded

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey pixels


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def walk_image_files(top: str) -> tuple[list[str], list[str], bool]:
    """(image files, folders, whether a symlinked file was met) under ``top``, as paths relative to it.

    The rules of ``Path.rglob("*")`` filtered to image files, at ``os.scandir`` speed (names are
    compared as strings; no file is stat-ed unless it is a symlink): hidden files are listed, hidden
    folders (``.ipynb_checkpoints``: tools keep copies there) and symlinked folders are not entered,
    a symlink to an image file counts, a folder that cannot be read is left out. Unsorted.
    """
    files, folders, symlinked, pending = [], [""], False, [""]
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(os.path.join(top, relative)) as scanned:
                entries = list(scanned)
        except PermissionError:
            continue
        for entry in entries:
            name = relative + entry.name
            if is_image_file(entry.name) and entry.is_file():
                files.append(name)
                symlinked = symlinked or entry.is_symlink()
            elif not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                folders.append(name + os.sep)
                pending.append(name + os.sep)
    return files, folders, symlinked


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder`` (recursively, hidden files included, but nothing inside a hidden
    folder such as ``.ipynb_checkpoints``: tools keep copies there), sorted by path."""
    base = str(Path(folder))
    files = sorted(walk_image_files(base)[0])
    return files if base == "." else [os.path.join(base, name) for name in files]


def load_rgb(source, min_side: int | None = None) -> Image.Image:
    """Open any image (a path or a binary file object) as RGB, EXIF orientation applied; first frame of animations.

    ``min_side``: the smallest shorter side the caller needs. JPEGs much larger than that are decoded
    at 1/2, 1/4 or 1/8 scale (PIL draft mode, DCT-domain downscaling, still >= min_side), about twice
    as fast as a full decode followed by a resize. Deterministic for a given file.
    """
    try:
        with Image.open(source) as image:
            if min_side is not None and image.format == "JPEG":
                width, height = image.size
                scale = min_side / min(width, height)
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "an image")
        raise DataError(
            f"cannot read image {name}: {error}. Remove or replace the file "
            "(or pass --skip-bad-images to train on the rest)."
        ) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, palette expanded, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 1 / 257 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 1
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be trained on (None if it decodes). JPEGs decode at reduced size: fast."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        load_rgb(path, min_side=SCAN_MIN_SIDE)
    except DataError as error:
        return str(error.__cause__ or error)
    except OSError as error:
        return str(error)
    return None


def check_file(path: str) -> tuple[str | None, str | None]:
    """(problem, SHA-256 of the bytes) of one file."""
    problem = image_problem(path)
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        digest = None
    return problem, digest


def named_bytes(data: bytes, name: str) -> io.BytesIO:
    """Encoded image bytes as a file object whose ``name`` error messages can show."""
    handle = io.BytesIO(data)
    handle.name = name
    return handle


def check_bytes(data: bytes, name: str) -> tuple[str | None, str]:
    """(problem, SHA-256) of one encoded image held in memory (a dataset row), like :func:`check_file`."""
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return "empty image (0 bytes)", digest
    try:
        load_rgb(named_bytes(data, name), min_side=SCAN_MIN_SIDE)
    except DataError as error:
        return str(error.__cause__ or error), digest
    return None, digest


def file_stamp(path: str) -> list:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


class FileImages:
    """The default reader: every item is an image file's path; ``root`` names the scan cache."""

    stamps_are_stats = True  # taken in one thread: ~4 us each, twice that spread over threads (the GIL)

    def __init__(self, root: str | os.PathLike | None = None):
        self.cache_key = str(root) if root is not None else None

    def open(self, item: str) -> str:
        return item

    def stamp(self, item: str) -> list:
        return file_stamp(item)

    def check(self, item: str) -> tuple[str | None, str | None]:
        return check_file(item)


@contextmanager
def cache_lock(cache_file: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_file``'s lock file: processes scanning the same images at once
    (every rank of a job building its data) wait for the first, then read its verdicts."""
    if not cache_file:
        yield
        return
    Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{cache_file}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: scan anyway (the cache is still replaced atomically)
            pass
        yield


SCAN_CACHE_COLUMNS = 2  # the columnar cache file: [2, items, then one list per field of the entries]


def _read_cache(cache_file: str | os.PathLike | None) -> dict[str, list]:
    """The cached entries (none for no file or an unreadable one; the file is only ever replaced whole)."""
    if not cache_file or not os.path.isfile(cache_file):
        return {}
    try:
        stored = json.loads(Path(cache_file).read_text())
    except ValueError:
        return {}
    if isinstance(stored, list) and stored[:1] == [SCAN_CACHE_COLUMNS]:
        return dict(zip(stored[1], map(list, zip(*stored[2:]))))
    return stored if isinstance(stored, dict) else {}  # {item: entry}: entries of mixed shapes, or an older file


def _cache_text(cache: dict[str, list]) -> str:
    """``cache`` as columns (a few flat lists decode ~3x faster than 1 M small ones) when all its entries have
    one shape, else as {item: entry}."""
    if len({len(entry) for entry in cache.values()}) != 1:
        return json.dumps(cache)
    return json.dumps([SCAN_CACHE_COLUMNS, list(cache), *map(list, zip(*cache.values()))])


def _in_chunks(pool: ThreadPoolExecutor, function, items: Sequence, workers: int) -> list:
    """``[function(item) for item in items]`` on the pool, a few hundred items per task: a future per item
    costs more than the stat of a warm scan."""
    size = max(1, min(256, len(items) // (4 * workers)))
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    return [result for chunk in pool.map(lambda part: [function(item) for item in part], chunks) for result in chunk]


def _check_stale(items: Sequence[str], cache: dict[str, list], reader) -> dict[str, list]:
    """{item: [*stamp, problem, sha256]}: ``cache``'s entry where the stamp is current, else checked now (threads)."""
    workers = min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and hashlib release the GIL
        in_threads = not getattr(reader, "stamps_are_stats", False)  # a stat holds the GIL: threads only slow it
        now = _in_chunks(pool, reader.stamp, items, workers) if in_threads else list(map(reader.stamp, items))
        cached = list(map(cache.get, items))
        if None not in cached and all(map(eq, map(itemgetter(slice(None, -2)), cached), now)):
            return dict(zip(items, cached))  # the warm case, compared in C loops: every stamp as cached
        stamps = dict(zip(items, now))
        entries = {i: cache[i] for i in items if i in cache and len(cache[i]) >= 3 and cache[i][:-2] == stamps[i]}
        todo = [i for i in items if i not in entries]
        for item, (problem, digest) in zip(todo, _in_chunks(pool, reader.check, todo, workers)):
            entries[item] = [*stamps[item], problem, digest]
    return {i: entries[i] for i in items}


def _update_cache(cache_file: str | os.PathLike | None, cache: dict[str, list], entries: dict[str, list]) -> None:
    """Add ``entries`` to ``cache`` and replace the file atomically, if any of them is new to it."""
    if cache_file and any(cache.get(item) != entry for item, entry in entries.items()):
        cache.update(entries)
        temporary = f"{cache_file}.{os.getpid()}.tmp"
        Path(temporary).write_text(_cache_text(cache))
        os.replace(temporary, cache_file)


def _scan(items: Sequence[str], cache_file: str | os.PathLike | None, reader, share) -> dict[str, list]:
    """{item: [*stamp, problem, sha256]} in ``items``' order (see :func:`scan`)."""
    if share is None:
        with cache_lock(cache_file):
            cache = _read_cache(cache_file)
            entries = _check_stale(items, cache, reader)
            _update_cache(cache_file, cache, entries)
        return entries
    known = _read_cache(cache_file)  # no lock: every process checks its own part at once
    merged = share(items, lambda part: _check_stale(part, known, reader))
    entries = {item: merged[item] for item in items}
    if any(known.get(item) != entry for item, entry in entries.items()):
        with cache_lock(cache_file):  # other processes may have stored the same verdicts meanwhile
            _update_cache(cache_file, _read_cache(cache_file), entries)
    return entries


def scan(items: Sequence[str], cache_file: str | os.PathLike | None = None,
         reader=None, share=None) -> dict[str, tuple[str | None, str | None]]:
    """{item: (problem or None, SHA-256 of its bytes)}, from the cache where its stamp is current.

    ``reader``: opens the items (default :class:`FileImages`: items are file paths). ``share``: check
    the items split over several processes: ``share(items, check)`` runs ``check`` on this process's
    part and returns every part's results merged, the same on every process
    (``distributed.split_over_ranks``); each process then stores the merged verdicts in its cache, so
    node-local caches start warm next time. Without it, processes scanning at once wait for the first.
    """
    with _collector_paused():
        entries = _scan(items, cache_file, reader or FileImages(), share)
        return {item: (entry[-2], entry[-1]) for item, entry in entries.items()}


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: a warm scan builds a few small objects per image, none in a
    cycle, and the collector's passes over them cost as much as building them (0.5 of 1.1 s at 210 k)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def scan_images(paths: Sequence[str], cache_file: str | os.PathLike | None = None, reader=None) -> dict[str, str]:
    """{item: problem} for every unreadable image, decoding in threads; verdicts cached (see :func:`scan`)."""
    return {p: problem for p, (problem, _) in scan(paths, cache_file, reader).items() if problem is not None}


def content_digests(paths: Sequence[str], cache_file: str | os.PathLike | None = None,
                    reader=None) -> dict[str, str]:
    """{item: SHA-256 of its bytes}, from the scan's cache where it is current."""
    return {p: digest for p, (_, digest) in scan(paths, cache_file, reader).items() if digest is not None}


def scan_cache_file(key: str) -> Path:
    """Where the scan verdicts of one image source (a folder, an image root, a dataset file) are cached
    (outside the data, which may be read-only)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_finetune" / "image_scans"
    return base / (hashlib.sha1(str(Path(key).resolve()).encode()).hexdigest()[:16] + ".json")
