"""Image-folder data: discovery with `datasets`' imagefolder builder, decoding, transforms, loaders.

Loaders yield uint8 NCHW tensors; the model converts and normalises them on its own device (see
``task.ImageClassifier.forward``), so a batch crosses to the GPU at a quarter of the float32 size
and the normalisation constants travel with the checkpoint instead of the data pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .errors import DataError
from .images import IMAGE_EXTENSIONS, list_image_files, load_rgb, scan_cache_file, scan_images

EVAL_RESIZE_RATIO = 0.875  # resize to size/0.875, then center-crop size (the torchvision convention)


def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def eval_resize_size(image_size: int) -> int:
    """The short side eval_transform resizes to before its center crop (256 for 224)."""
    return int(round(image_size / EVAL_RESIZE_RATIO))


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(eval_resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    value ^= value >> 31
    return value % (1 << 63)


class EpochSampler(Sampler[int]):
    """A sample order that depends on (seed, epoch) only, never on how many processes or workers run.

    Yields ``epoch * len + index`` so the dataset learns the epoch even inside persistent workers;
    with it, each sample's augmentation is seeded by (seed, epoch, index), so skipping batches on a
    mid-epoch resume, or sharding them over N ranks, leaves every other sample's pixels unchanged.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
        else:
            order = range(self.length)
        return (self.epoch * self.length + index for index in order)


class ImageListDataset(Dataset):
    """(path, label) pairs decoded on access into uint8 CHW tensors.

    Keys are ``epoch * len + index`` (see :class:`EpochSampler`); random transforms draw from a
    generator seeded per (seed, epoch, index) instead of the worker's global stream.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform, min_side: int | None,
                 random_transform: bool = False, seed: int = 0):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.min_side = min_side
        self.random_transform = random_transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        epoch, index = divmod(key, len(self.paths))
        image = load_rgb(self.paths[index], self.min_side)
        if not self.random_transform:
            return self.transform(image), self.labels[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), self.labels[index]


def _class_files(folder: str, role: str) -> dict[str, list[str]]:
    """{class: its image files}; fails early, naming the path, on shapes imagefolder would mis-read."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{role} folder {folder} does not exist (expected {role}/<class>/<image files>)")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{role} folder {folder} has no class subfolders: put images in {folder}/<class_name>/")
    files = {name: list_image_files(root / name) for name in classes}
    for name, found in files.items():
        if not found:
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
    return files


def scan_folder(folder: str, role: str) -> tuple[list[str], list[int], list[str]]:
    """Paths, integer labels and class names of an imagefolder tree, via `datasets`' builder."""
    import datasets

    class_files = _class_files(folder, role)
    expected = list(class_files)
    if len(expected) < 2:
        raise DataError(f"{role} folder {folder} has one class ({expected[0]}): classification needs at least 2 "
                        "class subfolders")
    datasets.disable_progress_bars()
    # list the files explicitly: given only data_dir, the builder guesses splits from file names
    # ("train_0.jpg", "test_1.jpg") and silently drops or rejects files
    files = sorted(path for found in class_files.values() for path in found)
    table = datasets.load_dataset("imagefolder", data_files={"train": files}, split="train")
    table = table.cast_column("image", datasets.Image(decode=False))
    label_feature = table.features.get("label")
    if label_feature is None:
        raise DataError(f"{role} folder {folder}: no class labels found (expected {folder}/<class>/<images>)")
    names = list(label_feature.names)
    if names != expected:
        raise DataError(f"{role} folder {folder}: classes {names} read, but folders are {expected}")
    paths = [entry["path"] for entry in table["image"]]
    return paths, list(table["label"]), names


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class to val, at least one, seeded."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < 2:
            raise DataError(f"class {label} has {len(members)} image(s): a val split needs at least 2 per class")
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def default_num_workers(local_processes: int) -> int:
    """Workers per process so that workers x processes stays within the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_processes) - 1))


@dataclass
class ImageClassificationData:
    """Train/val image lists and loader settings; build with :meth:`from_folders`."""

    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    classes: list[str]
    image_size: int = 224
    batch_size: int = 32
    num_workers: int | None = None
    augment: bool = True
    skip_bad_images: bool = False
    source: dict = field(default_factory=dict)

    @classmethod
    def from_folders(
        cls,
        train_folder: str,
        valid_folder: str | None = None,
        val_split: float = 0.2,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: bool = True,
        seed: int = 42,
        skip_bad_images: bool = False,
    ) -> "ImageClassificationData":
        """Read ``train/<class>/*`` (and ``val/<class>/*``, else a stratified ``val_split`` of train)."""
        train_paths, train_labels, classes = scan_folder(train_folder, "train")
        if valid_folder is not None:
            val_paths, val_labels, val_classes = scan_folder(valid_folder, "val")
            if val_classes != classes:
                raise DataError(
                    f"val folder {valid_folder} has classes {val_classes} but train folder {train_folder} "
                    f"has {classes}; missing in val: {sorted(set(classes) - set(val_classes))}, "
                    f"extra in val: {sorted(set(val_classes) - set(classes))}"
                )
        else:
            train_idx, val_idx = stratified_split(train_labels, val_split, seed)
            val_paths, val_labels = [train_paths[i] for i in val_idx], [train_labels[i] for i in val_idx]
            train_paths, train_labels = [train_paths[i] for i in train_idx], [train_labels[i] for i in train_idx]
        source = {"train_folder": str(train_folder), "valid_folder": valid_folder, "val_split": val_split}
        return cls(train_paths, train_labels, val_paths, val_labels, classes, image_size, batch_size,
                   num_workers, augment, skip_bad_images, source)

    def check_images(self) -> dict[str, str]:
        """Decode every image once (cached); drop the unreadable ones if ``skip_bad_images``, else raise.

        Returns {path: problem} of what was skipped. Runs before training, so a bad file never stops
        a run halfway.
        """
        folders = [self.source.get("train_folder"), self.source.get("valid_folder")]
        problems: dict[str, str] = {}
        for folder, paths in zip(folders, (self.train_paths, self.val_paths)):
            cache = scan_cache_file(folder) if folder else None
            problems.update(scan_images(paths, cache))
        if problems and not self.skip_bad_images:
            path, problem = next(iter(sorted(problems.items())))
            others = f" ({len(problems) - 1} more unreadable)" if len(problems) > 1 else ""
            raise DataError(f"cannot read image {path}: {problem}{others}. Remove or replace it, or pass "
                            "skip_bad_images=True (--skip-bad-images) to train on the rest.")
        for paths, labels in ((self.train_paths, self.train_labels), (self.val_paths, self.val_labels)):
            kept = [(p, y) for p, y in zip(paths, labels) if p not in problems]
            paths[:], labels[:] = [p for p, _ in kept], [y for _, y in kept]
        for role, labels in (("train", self.train_labels), ("val", self.val_labels)):
            empty = sorted(set(self.classes) - {self.classes[y] for y in labels})
            if empty:
                raise DataError(f"after skipping unreadable images, {role} has no images of class(es) {empty}")
        return problems

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_dataset(self, seed: int = 0) -> ImageListDataset:
        transform = train_transform(self.image_size) if self.augment else eval_transform(self.image_size)
        # RandomResizedCrop may keep only ~8% of the area; decode large enough that the crop is not upsampled
        min_side = self.image_size * 2 if self.augment else eval_resize_size(self.image_size)
        return ImageListDataset(self.train_paths, self.train_labels, transform, min_side, self.augment, seed)

    def val_dataset(self) -> ImageListDataset:
        # draft-decode no smaller than eval_transform's resize target, which is then downsampled, never up
        return ImageListDataset(self.val_paths, self.val_labels, eval_transform(self.image_size),
                                eval_resize_size(self.image_size))

    def dataloader(self, dataset: Dataset, shuffle: bool, local_processes: int = 1, pin_memory: bool = False,
                   drop_last: bool = False, seed: int = 0, num_workers: int | None = None,
                   persistent_workers: bool = True) -> DataLoader:
        """A loader over ``dataset`` in :class:`EpochSampler` order, workers sized for the CPU cores."""
        workers = num_workers if num_workers is not None else self.num_workers
        workers = default_num_workers(local_processes) if workers is None else workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), seed, shuffle),
            num_workers=workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
            persistent_workers=persistent_workers and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
        )
