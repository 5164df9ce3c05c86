"""``dist-finetune pack``: an image folder (or csv files) written once as a `datasets` dataset on disk, so
that every later run (``--dataset PATH``) starts with no listing and no image scan.

The packed dataset is a ``save_to_disk`` folder (Arrow shards, memory-mapped when read): splits
``train`` (and ``validation`` when the source has val images), an ``image`` column holding each file's
bytes (its path relative to the source in ``path``) and a ``label`` ClassLabel of the source's classes,
rows in the source's order. The scan runs at packing time: unreadable files stop it (named) or, with
``skip_bad_images``, are left out; ``dedupe`` leaves out every byte-identical copy but the first.
``pack_manifest.json`` records the source, its state (every folder's stamp, see ``listing``; a csv
file's size and mtime) and each file left out and why. Training from it compares that state with the
source's, where the source exists, and says when files were added, removed or renamed since.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ConfigError, DataError
from .images import scan, scan_cache_file
from .listing import changed_folders, folder_state
from .sources import Labeled, read_csv, read_folders
from .splits import first_listings, identical_groups, later_duplicates

MANIFEST = "pack_manifest.json"
WRITE_BATCH = 1000  # rows per Arrow batch while packing


def _source_state(description: dict) -> dict:
    """What tells later whether the source changed: folder stamps, or the csv files' size and mtime."""
    if description.get("train_folder"):
        return {"folders": {role: {"path": os.path.abspath(description[key]),
                                   "state": folder_state(description[key], role)}
                            for role, key in (("train", "train_folder"), ("val", "valid_folder"))
                            if description.get(key)}}
    files = [description[key] for key in ("train_csv", "val_csv") if description.get(key)]
    return {"files": {os.path.abspath(file): [os.stat(file).st_size, os.stat(file).st_mtime_ns] for file in files}}


def _dropped(splits: dict[str, Labeled], classes: list[str], reader, skip_bad_images: bool,
             dedupe: bool) -> dict[tuple[str, str], str]:
    """{(split, item): why it is left out}, the decisions ``ImageClassificationData.check_images`` takes."""
    for split, labeled in splits.items():
        kept, _ = first_listings(split, labeled.items, labeled.labels, classes)
        labeled.items[:], labeled.labels[:] = [labeled.items[i] for i in kept], [labeled.labels[i] for i in kept]
    everything = [item for labeled in splits.values() for item in labeled.items]
    results = scan(list(dict.fromkeys(everything)), scan_cache_file(reader.cache_key), reader)
    problems = {item: problem for item, (problem, _) in results.items() if problem is not None}
    if problems and not skip_bad_images:
        item, problem = sorted(problems.items())[0]
        raise DataError(f"cannot read image {item}: {problem} ({len(problems)} unreadable). Remove or replace it, "
                        "or pass --skip-bad-images to pack the rest (the manifest lists what is left out)")
    dropped = {(split, item): f"unreadable: {problems[item]}" for split, labeled in splits.items()
               for item in labeled.items if item in problems}
    if dedupe:
        digests = {item: digest for item, (problem, digest) in results.items() if problem is None and digest}
        groups = identical_groups(everything, digests)
        first = {item: group[0] for group in groups for item in group}
        from_train, from_val = later_duplicates(groups, set(splits["train"].items))
        for split, items in (("train", from_train), ("validation", from_val)):
            dropped.update({(split, item): f"byte-identical to {first[item]}" for item in items})
    return dropped


def _write_split(path: Path, labeled: Labeled, left_out: set[str], root: str, features) -> None:
    from datasets.arrow_writer import ArrowWriter

    rows = [(item, label) for item, label in zip(labeled.items, labeled.labels) if item not in left_out]
    with ArrowWriter(features=features, path=str(path)) as writer:
        for start in range(0, len(rows), WRITE_BATCH):
            batch = rows[start:start + WRITE_BATCH]
            writer.write_batch(features.encode_batch({
                "image": [{"bytes": Path(item).read_bytes(), "path": os.path.relpath(item, root)} for item, _ in batch],
                "label": [label for _, label in batch]}))
        writer.finalize()


def pack(output: str, train_folder: str | None = None, val_folder: str | None = None, train_csv: str | None = None,
         val_csv: str | None = None, image_root: str | None = None, skip_bad_images: bool = False,
         dedupe: bool = False, max_shard_size: str = "500MB") -> dict:
    """Pack one source into ``output`` (see the module docstring); returns the manifest."""
    import datasets

    if (train_folder is None) == (train_csv is None):
        raise ConfigError("pack takes one source: --train-folder (with --val-folder) or --train-csv")
    if os.path.exists(output):
        raise ConfigError(f"pack: {output} exists; remove it or choose another --output")
    source = read_folders(train_folder, val_folder) if train_folder else read_csv(train_csv, image_root, val_csv)
    splits = {"train": source.train, **({"validation": source.val} if source.val is not None else {})}
    dropped = _dropped(splits, source.classes, source.reader, skip_bad_images, dedupe)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=source.classes)})
    root = os.path.commonpath([os.path.abspath(item) for labeled in splits.values() for item in labeled.items[:1]]
                              + [os.path.abspath(train_folder or source.description["image_root"])])
    staging = Path(f"{output}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts = {}
    for split, labeled in splits.items():
        _write_split(staging / f"{split}.arrow", labeled, {item for (s, item) in dropped if s == split}, root, features)
        parts[split] = datasets.Dataset.from_file(str(staging / f"{split}.arrow"))
    datasets.disable_progress_bars()
    datasets.DatasetDict(parts).save_to_disk(str(staging / "packed"), max_shard_size=max_shard_size)
    manifest = {"format": 1, "source": source.description, **_source_state(source.description),
                "classes": source.classes, "rows": {split: len(part) for split, part in parts.items()},
                "skip_bad_images": skip_bad_images, "dedupe": dedupe,
                "dropped": [{"split": split, "item": item, "reason": reason}
                            for (split, item), reason in sorted(dropped.items())]}
    (staging / "packed" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    del parts
    os.replace(staging / "packed", output)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def packed_note(path: str) -> str | None:
    """None unless ``path`` was written by :func:`pack`; else one line for the run's log: what it was made
    from, and a warning when that source changed since (files added, removed or renamed)."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    changed = [folder for entry in manifest.get("folders", {}).values() if os.path.isdir(entry["path"])
               for folder in changed_folders(entry["path"], entry["state"])]
    changed += [file for file, stamp in manifest.get("files", {}).items()
                if os.path.isfile(file) and [os.stat(file).st_size, os.stat(file).st_mtime_ns] != stamp]
    made_from = manifest["source"].get("train_folder") or manifest["source"].get("train_csv")
    if changed:
        return (f"warning: packed dataset {path} was made from {made_from}, which has changed since it was packed "
                f"({len(changed)} changed: {', '.join(changed[:3])}): training on the packed copy; run "
                "dist-finetune pack again to train on what is there now")
    return (f"packed dataset {path} (from {made_from}): scanned when packed, {len(manifest['dropped'])} file(s) left "
            f"out (listed in {manifest_file}); no listing or scan now")
