"""Training data: sources read into item lists, decoding, transforms, sample order, loaders.

``ImageClassificationData`` holds train/val *items* (``train_paths``/``val_paths``: file paths for
folders and csv files, ``"<part>[<row>]"`` for images inside a `datasets` dataset) with integer
labels, class names, and the reader that opens an item (see ``sources``); everything downstream
(splits, the bad-image scan, dedupe, feature caching, sample order) works on those strings alone.

Loaders yield uint8 NCHW tensors; the model converts and normalises them on its own device (see
``task.ImageClassifier.forward``), so a batch crosses to the GPU at a quarter of the float32 size
and the normalisation constants travel with the checkpoint instead of the data pipeline.
"""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import AUGMENT_POLICIES, eval_resize_size, eval_transform, sample_seed, train_transform
from .distributed import local_world_size, same_on_every_rank, split_over_ranks
from .errors import ConfigError, DataError, check_choice
from .images import FileImages, content_digests, load_rgb, scan, scan_cache_file
from .load_failures import LoadFailures
from .packing import packed_note
from .sources import Labeled, Source, read_csv, read_datasets, read_folders, read_hub
from .splits import (
    balanced_class_weights,
    class_count_lines,
    duplicate_report,
    first_listings,
    identical_groups,
    imbalance_warning,
    later_duplicates,
    stratified_split,
)

CLASS_WEIGHTS = ("none", "auto")


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


REPEAT_STRIDE = 1 << 20  # epochs apart: the k-th repeat of a sample in one epoch is seeded as epoch + k * this


class BalancedSampler(Sampler[int]):
    """Class-balanced sampling: each epoch draws ``len(labels)`` samples with replacement, a sample's
    probability proportional to 1 / (images of its class): a class, uniformly, then one of its images.

    The draw depends on (seed, epoch) only, so resume stays bit-exact, and its keys are
    :class:`EpochSampler`'s ``epoch * len + index``, except that the k-th repeat of an index within an
    epoch is yielded as if from epoch ``epoch + k * REPEAT_STRIDE``: each repeat gets its own
    augmentation seed instead of the same crop. Under N processes every rank draws the same
    sequence and accelerate hands each rank its own batches of it, as with :class:`EpochSampler`.
    """

    def __init__(self, labels: Sequence[int], seed: int):
        self.length, self.seed, self.epoch = len(labels), seed, 0
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.members = torch.argsort(labels, stable=True)  # indices grouped by class
        _, self.counts = torch.unique(labels, return_counts=True)  # classes present, ascending
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        classes = torch.randint(len(self.counts), (self.length,), generator=generator)
        offsets = (torch.rand(self.length, generator=generator, dtype=torch.float64) * self.counts[classes]).long()
        draws = self.members[self.starts[classes] + offsets].tolist()
        repeats: Counter = Counter()
        for index in draws:
            yield (self.epoch + repeats[index] * REPEAT_STRIDE) * self.length + index
            repeats[index] += 1


class ImageListDataset(Dataset):
    """(item, label) pairs decoded on access into uint8 CHW tensors.

    Keys are ``epoch * len + index`` (see :class:`EpochSampler`); random transforms draw from a
    generator seeded per (seed, epoch, index) instead of the worker's global stream. ``reader``
    opens an item (default: items are file paths). ``failures`` (``scan=False``): an item that fails to
    load is recorded there and replaced by the next loadable one in the list (its label too).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform, min_side: int | None,
                 random_transform: bool = False, seed: int = 0, reader=None, failures: LoadFailures | None = None):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.min_side = min_side
        self.random_transform = random_transform
        self.seed = seed
        self.reader = reader or FileImages()
        self.failures = failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        epoch, index = divmod(key, len(self.paths))
        image, label = self._load(index)
        if not self.random_transform:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label

    def _load(self, index: int):
        for at in (index + offset for offset in range(len(self.paths) if self.failures else 1)):
            item = self.paths[at % len(self.paths)]
            try:
                return load_rgb(self.reader.open(item), self.min_side), self.labels[at % len(self.paths)]
            except DataError as error:
                if self.failures is None:
                    raise
                self.failures.record(item, str(error.__cause__ or error), self.paths[(at + 1) % len(self.paths)])
        raise DataError(f"none of the {len(self.paths)} images could be read; run without --no-scan to name them")


def default_num_workers(local_processes: int) -> int:
    """Workers per process so that workers x processes stays within the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_processes) - 1))


@dataclass
class ImageClassificationData:
    """Train/val items and labels, class names and loader settings.

    Build with :meth:`from_folders`, :meth:`from_datasets`, :meth:`from_hub` or :meth:`from_csv`.
    ``dedupe``: :meth:`check_images` keeps one of each group of byte-identical images (the first,
    train before val). ``class_weights="auto"``: inverse-frequency cross-entropy weights
    (:meth:`loss_weights`). ``balanced_sampler``: training draws classes equally often
    (:class:`BalancedSampler`).
    """

    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    classes: list[str]
    image_size: int = 224
    batch_size: int = 32
    num_workers: int | None = None
    augment: bool = True
    augment_policy: str = "basic"  # with augment: the train transform (augment.AUGMENT_POLICIES)
    skip_bad_images: bool = False
    source: dict = field(default_factory=dict)
    reader: object = field(default_factory=FileImages, repr=False)  # opens an item (see ``sources``)
    dedupe: bool = False
    class_weights: str = "none"
    balanced_sampler: bool = False
    scan: bool = True  # False: no up-front scan; an image that fails to load is replaced (load_failures)
    duplicates: list[list[str]] = field(default_factory=list, init=False, repr=False)  # set by check_images
    summary: list[str] = field(default_factory=list, init=False, repr=False)  # set by check_images
    load_failures: LoadFailures | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
        check_choice("augment_policy (--augment)", self.augment_policy, AUGMENT_POLICIES)
        if not self.augment and self.augment_policy != "basic":
            raise ConfigError(f"augment_policy {self.augment_policy!r} needs augment on: drop --no-augment")
        self.load_failures = None if self.scan else LoadFailures()

    @classmethod
    def from_folders(cls, train_folder: str, valid_folder: str | None = None, val_split: float = 0.2,
                     image_size: int = 224, batch_size: int = 32, num_workers: int | None = None,
                     augment: bool = True, seed: int = 42, skip_bad_images: bool = False,
                     **options) -> "ImageClassificationData":
        """Read ``train/<class>/*`` (and ``val/<class>/*``, else a stratified ``val_split`` of train).

        ``options``: ``augment_policy``, ``dedupe``, ``class_weights``, ``balanced_sampler``, ``scan``.
        """
        return cls.from_source(read_folders(train_folder, valid_folder), val_split, seed, image_size=image_size,
                               batch_size=batch_size, num_workers=num_workers, augment=augment,
                               skip_bad_images=skip_bad_images, **options)

    @classmethod
    def from_datasets(cls, train_dataset, val_dataset=None, image_column: str = "image", label_column: str = "label",
                      val_split: float = 0.2, seed: int = 42, **settings) -> "ImageClassificationData":
        """`datasets.Dataset` objects with an image column (``datasets.Image``, encoded bytes or paths)
        and a label column (ClassLabel, or strings: classes are the sorted labels). Items are
        ``"train_dataset[i]"`` / ``"val_dataset[i]"``. ``settings``: this class's fields
        (``image_size``, ``batch_size``, ``num_workers``, ``augment``, ``augment_policy``, ``skip_bad_images``,
        ``dedupe``, ``class_weights``, ``balanced_sampler``)."""
        parts = {"train_dataset": train_dataset, **({"val_dataset": val_dataset} if val_dataset is not None else {})}
        source = read_datasets(parts, image_column, label_column, {"datasets": list(parts)})
        return cls.from_source(source, val_split, seed, **settings)

    @classmethod
    def from_hub(cls, name_or_path: str, image_column: str = "image", label_column: str = "label",
                 train_split: str = "train", val_split_name: str | None = None, val_split: float = 0.2,
                 seed: int = 42, **settings) -> "ImageClassificationData":
        """A Hub dataset name (needs internet), a local folder of parquet/arrow files
        (``datasets.load_dataset``) or a ``save_to_disk`` folder (``datasets.load_from_disk``).

        Validation: the split ``val_split_name``; None takes "validation" when the dataset has one,
        else a stratified ``val_split`` of train. Items are ``"<name_or_path>:<split>[i]"``;
        ``settings`` as in :meth:`from_datasets`.
        """
        source = read_hub(name_or_path, image_column, label_column, train_split, val_split_name)
        note = packed_note(name_or_path)  # made by `dist-finetune pack`: scanned then, not again
        if note is not None:
            source.description["packed"] = note
            settings["scan"] = False if settings.get("scan") is None else settings["scan"]
        return cls.from_source(source, val_split, seed, **settings)

    @classmethod
    def from_csv(cls, csv_file: str, image_root: str | None = None, val_csv: str | None = None,
                 val_split: float = 0.2, seed: int = 42, **settings) -> "ImageClassificationData":
        """``path,label`` rows (optional ``path,label`` header); paths relative to ``image_root``
        (default: the csv file's folder); classes are the sorted labels; without ``val_csv`` a
        stratified ``val_split`` of train. ``settings`` as in :meth:`from_datasets`."""
        return cls.from_source(read_csv(csv_file, image_root, val_csv), val_split, seed, **settings)

    @classmethod
    def from_source(cls, source: Source, val_split: float = 0.2, seed: int = 42,
                    **settings) -> "ImageClassificationData":
        """Data from a :class:`~dist_finetune.sources.Source`; one without val gets a stratified, seeded
        ``val_split`` of train in which byte-identical images (content hashes from the image scan,
        which therefore runs now) stay on one side."""
        train, val = source.train, source.val
        settings["scan"] = settings.get("scan") is not False  # None: the default, scan
        if val is None:
            reader = source.reader
            digests = content_digests(train.items, _cache_file(reader), reader) if settings["scan"] else {}
            train_idx, val_idx = stratified_split(train.labels, val_split, seed,
                                                  [digests.get(item, item) for item in train.items])
            val = Labeled([train.items[i] for i in val_idx], [train.labels[i] for i in val_idx])
            train = Labeled([train.items[i] for i in train_idx], [train.labels[i] for i in train_idx])
        data = cls(train.items, train.labels, val.items, val.labels, source.classes,
                   source={**source.description, "val_split": val_split}, reader=source.reader, **settings)
        data._require_every_class("")
        return data

    def check_images(self, accelerator=None) -> dict[str, str]:
        """Decode every image once (cached); drop the unreadable ones if ``skip_bad_images``, else raise.

        A file listed twice in one split is kept once (a warning names it). Also groups byte-identical
        images (``duplicates``; with ``dedupe`` exactly one of each stays: the first, train before val)
        and writes ``summary``: images per class, leakage between train and val (the same file in both,
        or identical bytes), imbalance. Returns {item: problem} of what was skipped. Runs before
        training, so a bad file never stops a run halfway. ``accelerator``: all ranks take rank 0's
        train/val lists (a val split each process drew alone may differ), each decodes every Nth image,
        and all decide from the merged verdicts, so every rank skips and drops exactly the same images.
        """
        share = None
        if accelerator is not None:
            share = partial(split_over_ranks, accelerator)
            lists = (self.train_paths, self.train_labels, self.val_paths, self.val_labels)
            self.train_paths, self.train_labels, self.val_paths, self.val_labels = \
                map(list, same_on_every_rank(accelerator, lists))
        repeats = []
        for role, paths, labels in (("train", self.train_paths, self.train_labels),
                                    ("val", self.val_paths, self.val_labels)):
            kept, line = first_listings(role, paths, labels, self.classes)
            paths[:], labels[:] = [paths[i] for i in kept], [labels[i] for i in kept]
            repeats += [line] if line else []
        everything = self.train_paths + self.val_paths  # a file listed in both splits is here twice
        results = scan(list(dict.fromkeys(everything)), _cache_file(self.reader), self.reader, share) if self.scan else {}
        problems = {item: problem for item, (problem, _) in results.items() if problem is not None}
        if problems and not self.skip_bad_images:
            path, problem = next(iter(sorted(problems.items())))
            others = f" ({len(problems) - 1} more unreadable)" if len(problems) > 1 else ""
            raise DataError(f"cannot read image {path}: {problem}{others}. Remove or replace it, or pass "
                            "skip_bad_images=True (--skip-bad-images) to train on the rest.")
        digests = {item: digest for item, (problem, digest) in results.items() if problem is None and digest}
        self.duplicates = identical_groups(everything, digests)
        names = {item: self.classes[y] for item, y in zip(everything, self.train_labels + self.val_labels)}
        train_items, val_items = set(self.train_paths), set(self.val_paths)
        duplicate_lines = duplicate_report(self.duplicates, train_items, val_items, names, self.dedupe)
        from_train, from_val = later_duplicates(self.duplicates, train_items) if self.dedupe else (set(), set())
        for paths, labels, dropped in ((self.train_paths, self.train_labels, set(problems) | from_train),
                                       (self.val_paths, self.val_labels, set(problems) | from_val)):
            kept = [(p, y) for p, y in zip(paths, labels) if p not in dropped]
            paths[:], labels[:] = [p for p, _ in kept], [y for _, y in kept]
        self._require_every_class("after dropping unreadable or duplicate images, ")
        imbalance = imbalance_warning(self.classes, self.train_labels)
        unscanned = [] if self.scan else [self.source.get("packed") or "images not scanned (--no-scan): one that "
                                          "fails to load is replaced by the next readable image, named, and counted"]
        self.summary = [*class_count_lines(self.classes, self.train_labels, self.val_labels), *repeats, *unscanned,
                        *duplicate_lines, *([imbalance] if imbalance else [])]
        return problems

    def _require_every_class(self, context: str) -> None:
        for role, labels in (("train", self.train_labels), ("val", self.val_labels)):
            empty = sorted(set(self.classes) - {self.classes[y] for y in labels})
            if empty:
                raise DataError(f"{context}{role} has no images of class(es) {empty}: every class needs train and "
                                "val images")

    def loss_weights(self) -> list[float] | None:
        """Per-class cross-entropy weights from the train split as it is now (``class_weights="auto"``:
        N / (C x n_c)), else None."""
        if self.class_weights == "none":
            return None
        return balanced_class_weights(self.train_labels, self.num_classes)

    def signature(self) -> dict | None:
        """The settings that change what training sees beyond the class list (None: the defaults), so a
        resume with other ones is refused."""
        settings = {"dedupe": self.dedupe, "class_weights": self.class_weights,
                    "balanced_sampler": self.balanced_sampler,
                    **({"augment_policy": self.augment_policy} if self.augment_policy != "basic" else {})}
        return settings if settings != {"dedupe": False, "class_weights": "none", "balanced_sampler": False} else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_dataset(self, seed: int = 0) -> ImageListDataset:
        size = self.image_size
        transform = train_transform(size, self.augment_policy) if self.augment else eval_transform(size)
        # RandomResizedCrop may keep only ~8% of the area; decode large enough that the crop is not upsampled
        min_side = self.image_size * 2 if self.augment else eval_resize_size(self.image_size)
        return ImageListDataset(self.train_paths, self.train_labels, transform, min_side, self.augment, seed,
                                self.reader, self.load_failures)

    def val_dataset(self) -> ImageListDataset:
        # draft-decode no smaller than eval_transform's resize target, which is then downsampled, never up
        return ImageListDataset(self.val_paths, self.val_labels, eval_transform(self.image_size),
                                eval_resize_size(self.image_size), reader=self.reader, failures=self.load_failures)

    def dataloader(self, dataset: Dataset, shuffle: bool, local_processes: int | None = None,
                   pin_memory: bool = False, drop_last: bool = False, seed: int = 0, num_workers: int | None = None,
                   persistent_workers: bool = True) -> DataLoader:
        """A loader over ``dataset`` in :class:`EpochSampler` order (shuffled with ``balanced_sampler``:
        :class:`BalancedSampler` over ``dataset.labels``), workers sized for the CPU cores the
        ``local_processes`` (default: the launcher's processes on this machine) share."""
        workers = num_workers if num_workers is not None else self.num_workers
        workers = default_num_workers(local_processes or local_world_size()) if workers is None else workers
        if shuffle and self.balanced_sampler:
            sampler = BalancedSampler(dataset.labels, seed)
        else:
            sampler = EpochSampler(len(dataset), seed, shuffle)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            drop_last=drop_last,
            persistent_workers=persistent_workers and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
        )


def _cache_file(reader):
    """The scan cache of a reader's images, or None (in-memory datasets)."""
    return scan_cache_file(reader.cache_key) if reader.cache_key else None
