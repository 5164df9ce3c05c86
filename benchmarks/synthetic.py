"""The speed benchmark's data: a generated folder of photo-sized JPEGs, cached between runs while
its settings match.

Images are random but structured (a smooth colour field, soft-edged objects, textured patches and
sensor noise), so decoding them costs what decoding photos costs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = 2
CLASSES = ("class_a", "class_b", "class_c", "class_d")
CLASS_TINTS = ((30, -10, -20), (-20, 25, -10), (-15, -10, 30), (20, 20, -25))
SMALL_SIZE = (500, 375)     # width, height: a typical web photo
LARGE_SIZE = (2000, 1500)   # a 3-megapixel camera photo
PORTRAIT_FRACTION = 0.2     # of the small images, 375x500
JPEG_QUALITY = 90


def synth_photo(width: int, height: int, seed: int, class_index: int) -> Image.Image:
    """A photo-like image: smooth colour field, objects with soft edges, textured patches, sensor noise."""
    rng = np.random.default_rng(seed)
    scale = width / SMALL_SIZE[0] if width >= height else height / SMALL_SIZE[0]
    field = np.zeros((height, width, 3), dtype=np.float32)
    for cell, amplitude in ((160, 50.0), (40, 15.0)):  # lighting / large regions, then mid-size detail
        cells = (max(2, round(height / (cell * scale))), max(2, round(width / (cell * scale))), 3)
        octave = np.clip(128 + 40 * rng.standard_normal(cells), 0, 255).astype(np.uint8)
        octave = np.asarray(Image.fromarray(octave).resize((width, height), Image.BICUBIC), dtype=np.float32)
        field += (octave - 128) * (amplitude / 40)
    field += 128 + np.asarray(CLASS_TINTS[class_index], dtype=np.float32)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(15, 35))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        w, h = float(rng.uniform(0.03, 0.3) * width), float(rng.uniform(0.03, 0.3) * height)
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif shape == 2:
            corners = int(rng.integers(3, 7))
            points = [(x + float(rng.uniform(-w, w)), y + float(rng.uniform(-h, h))) for _ in range(corners)]
            draw.polygon(points, fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=max(1, int(rng.integers(1, 6) * scale)))
    image = image.filter(ImageFilter.GaussianBlur(radius=0.8 * scale))

    pixels = np.asarray(image, dtype=np.float32).copy()
    for _ in range(int(rng.integers(3, 8))):  # textured regions: fabric, foliage, brickwork
        ph, pw = int(rng.uniform(0.15, 0.5) * height), int(rng.uniform(0.15, 0.5) * width)
        y0, x0 = int(rng.integers(0, height - ph)), int(rng.integers(0, width - pw))
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 14) * scale
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
        wave *= 1 + 0.5 * rng.standard_normal((ph, pw), dtype=np.float32)
        pixels[y0:y0 + ph, x0:x0 + pw] += float(rng.uniform(8, 25)) * wave[..., None]
    pixels += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)   # luminance noise
    pixels += 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)   # chroma noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_image(task: tuple) -> None:
    path, width, height, seed, class_index = task
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    synth_photo(width, height, seed, class_index).save(temporary, format="JPEG", quality=JPEG_QUALITY)
    os.replace(temporary, path)


def dataset_spec(args) -> dict:
    val_large = round(args.num_val * args.num_large / args.num_images)
    return {"version": GENERATOR_VERSION, "num_images": args.num_images, "num_large": args.num_large,
            "num_val": args.num_val, "num_val_large": val_large, "seed": args.seed, "classes": list(CLASSES),
            "small_size": list(SMALL_SIZE), "large_size": list(LARGE_SIZE), "portrait_fraction": PORTRAIT_FRACTION,
            "jpeg_quality": JPEG_QUALITY}


def plan_split(split: str, count: int, large: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    large_indices = set(rng.choice(count, size=large, replace=False).tolist()) if large else set()
    entries = []
    for index in range(count):
        label = index % len(CLASSES)
        if index in large_indices:
            size = LARGE_SIZE
        else:
            size = SMALL_SIZE[::-1] if rng.random() < PORTRAIT_FRACTION else SMALL_SIZE
        entries.append({"path": f"{split}/{CLASSES[label]}/img_{index:05d}.jpg", "label": label,
                        "size": list(size), "large": index in large_indices,
                        "seed": int(rng.integers(0, 2**31))})
    return entries


def prepare_dataset(root: Path, spec: dict) -> dict:
    """Generate (or reuse, when the manifest matches) ``root/train/<class>/*.jpg`` and ``root/val/...``."""
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["train"] + manifest["val"]
        if manifest.get("spec") == spec and all((root / e["path"]).is_file() for e in entries):
            manifest["generated"] = False
            return manifest
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"spec": spec,
                "train": plan_split("train", spec["num_images"], spec["num_large"], spec["seed"]),
                "val": plan_split("val", spec["num_val"], spec["num_val_large"], spec["seed"])}
    tasks = [(str(root / e["path"]), *e["size"], e["seed"], e["label"]) for e in manifest["train"] + manifest["val"]]
    tasks.sort(key=lambda task: -task[1] * task[2])  # large ones first: better balance over the pool
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(_write_image, tasks, chunksize=2):
            pass
    manifest["generation_s"] = round(time.perf_counter() - start, 2)
    temporary = manifest_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, manifest_path)
    manifest["generated"] = True
    return manifest


def describe_dataset(root: Path, manifest: dict) -> dict:
    def stats(entries):
        sizes = [os.path.getsize(root / e["path"]) for e in entries]
        return {"images": len(entries), "mean_kib": round(sum(sizes) / max(1, len(sizes)) / 1024, 1)}

    train = manifest["train"]
    return {"root": str(root), "generated_now": manifest["generated"], "generation_s": manifest.get("generation_s"),
            "train": stats(train), "val": stats(manifest["val"]),
            "small_jpeg": stats([e for e in train if not e["large"]]),
            "large_jpeg": stats([e for e in train if e["large"]])}
