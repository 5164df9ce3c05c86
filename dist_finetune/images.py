"""Image files: listing, decoding any file to RGB (fast draft decode for large JPEGs), and the
up-front scan that finds every unreadable file before training, with a cache keyed by size+mtime.

The scan also records each file's SHA-256, so byte-identical copies (a photo in both train and val)
can be found without reading the files again.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SCAN_MIN_SIDE = 32  # the scan decodes JPEGs at reduced size: every byte is still entropy-decoded

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey pixels


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder`` (recursively, hidden files included), sorted by path."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))


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


def _check_file(path: str) -> tuple[str | None, str | None]:
    """(problem, SHA-256 of the bytes) of one file."""
    problem = image_problem(path)
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        digest = None
    return problem, digest


def _stamp(path: str) -> list:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def _scan(paths: Sequence[str], cache_file: str | os.PathLike | None) -> dict[str, list]:
    """{path: [size, mtime_ns, problem, sha256]}, decoding in threads what the cache does not hold."""
    cache: dict[str, list] = {}
    if cache_file and os.path.isfile(cache_file):
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    todo = [p for p in paths if p not in cache or len(cache[p]) < 4 or cache[p][:2] != _stamp(p)]
    workers = min(32, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and hashlib release the GIL
        for path, (problem, digest) in zip(todo, pool.map(_check_file, todo)):
            cache[path] = [*_stamp(path), problem, digest]
    if cache_file and todo:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{cache_file}.{os.getpid()}.tmp"
        Path(temporary).write_text(json.dumps(cache))
        os.replace(temporary, cache_file)
    return {p: cache[p] for p in paths}


def scan_images(paths: Sequence[str], cache_file: str | os.PathLike | None = None) -> dict[str, str]:
    """{path: problem} for every unreadable image, decoding in threads; verdicts cached by size+mtime."""
    return {p: entry[2] for p, entry in _scan(paths, cache_file).items() if entry[2] is not None}


def content_digests(paths: Sequence[str], cache_file: str | os.PathLike | None = None) -> dict[str, str]:
    """{path: SHA-256 of its bytes}, from the scan's cache where it is current."""
    return {p: entry[3] for p, entry in _scan(paths, cache_file).items() if entry[3] is not None}


def scan_cache_file(folder: str) -> Path:
    """Where the scan verdicts of one image folder are cached (outside the data, which may be read-only)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_finetune" / "image_scans"
    return base / (hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16] + ".json")
