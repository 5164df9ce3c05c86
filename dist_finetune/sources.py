"""Where the images come from, read into one description: items, integer labels, class names, and
the reader that opens an item.

Sources: an image folder (``train/<class>/*``, listed file by file, no name read as a pattern), a
`datasets` dataset (in memory, a Hub name, a local folder of parquet/arrow files through
``datasets.load_dataset``, or a ``save_to_disk`` folder through ``datasets.load_from_disk``), and
csv files of ``path,label`` rows.

Item model: every image is a string *item*. For folders and csv files the item is the file's path
and the reader is :class:`~dist_finetune.images.FileImages`. For a dataset the item is
``"<part>[<row>]"`` (``"beans:train[12]"``, ``"train_dataset[3]"``) and the reader is
:class:`DatasetImages`, which keeps each part's image column (memory-mapped Arrow when the dataset
is on disk: nothing is copied into memory) and returns a row's encoded bytes when asked; decoding
happens in the loader workers. Workers are forked with the reader; where they are spawned instead,
a memory-mapped dataset pickles as its file names, an in-memory one as its data. So splits,
skipping, dedupe, feature caching and sample order treat every source alike.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import DataError
from .images import FileImages, check_bytes, check_file, file_stamp, named_bytes
from .listing import list_class_folder

OFFLINE_ALTERNATIVES = ("a local folder of parquet/arrow files or a save_to_disk folder (--dataset PATH), "
                        "csv files (--train-csv with --image-root), or an image folder (--train-folder)")


@dataclass
class Labeled:
    """Items of one split and their integer labels."""

    items: list[str]
    labels: list[int]


@dataclass
class Source:
    """What a source holds: train (and val, if the source has one), class names, the reader."""

    train: Labeled
    val: Labeled | None
    classes: list[str]
    reader: object = field(default_factory=FileImages)
    description: dict = field(default_factory=dict)  # JSON-able: where the data came from


# ------------------------------------------------------------------------------- folders


def scan_folder(folder: str, role: str) -> tuple[list[str], list[int], list[str]]:
    """Paths, integer labels and class names of ``folder/<class>/**``, sorted by path.

    Built from the listing itself, never through a pattern: every name a file system allows (``[``,
    ``*``, ``?``, ``#``, ``::``, spaces, a leading dash) is read as itself, each file once. Listed
    once per job (``listing``): later calls read the folder's index while the folder is unchanged.
    """
    return list_class_folder(folder, role)


def require_two_classes(classes: list[str], where: str) -> None:
    """Training needs two classes at least (an evaluation may hold one of the model's classes only)."""
    if len(classes) < 2:
        raise DataError(f"{where} has one class ({', '.join(classes)}): classification needs at least 2")


def read_folders(train_folder: str, valid_folder: str | None) -> Source:
    """``train/<class>/*`` and optionally ``val/<class>/*`` with the same classes."""
    train_paths, train_labels, classes = scan_folder(train_folder, "train")
    require_two_classes(classes, f"train folder {train_folder}")
    val = None
    if valid_folder is not None:
        val_paths, val_labels, val_classes = scan_folder(valid_folder, "val")
        if val_classes != classes:
            raise DataError(
                f"val folder {valid_folder} has classes {val_classes} but train folder {train_folder} "
                f"has {classes}; missing in val: {sorted(set(classes) - set(val_classes))}, "
                f"extra in val: {sorted(set(val_classes) - set(classes))}"
            )
        val = Labeled(val_paths, val_labels)
    return Source(Labeled(train_paths, train_labels), val, classes, FileImages(train_folder),
                  {"train_folder": str(train_folder), "valid_folder": valid_folder})


# ------------------------------------------------------------------------------- labels


def encode_labels(train: Sequence, val: Sequence | None, names: list[str] | None, where: tuple[str, str],
                  lines: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None),
                  training: bool = True) -> tuple[list[int], list[int] | None, list[str]]:
    """Integer labels and class names from raw label values (strings, or a ClassLabel's ids and names).

    Without ``names`` the classes are the sorted distinct values of train (numbers sorted as numbers).
    ``where``: how to name the train and val sources in errors; ``lines``: their rows' line numbers
    (csv files), else rows are named by index. ``training``: two classes at least are required.
    """
    if names is None:
        distinct = sorted({v for v in train if v is not None and str(v).strip()},
                          key=lambda value: (isinstance(value, str), value))
        names = [str(value) for value in distinct]
        index = {value: i for i, value in enumerate(distinct)}
    else:
        index = {i: i for i in range(len(names))}
    encoded = []
    for values, place, numbers in ((train, where[0], lines[0]), (val, where[1], lines[1])):
        if values is None:
            encoded.append(None)
            continue
        for row, value in enumerate(values):
            at = f"line {numbers[row]}" if numbers is not None else f"row {row}"
            if value is None or str(value).strip() == "":
                raise DataError(f"{place}: {at} has an empty label; fill it in or drop the row")
            if value not in index:
                raise DataError(f"{place}: {at} has label {value!r}, which {where[0]} does not have "
                                f"(classes: {names})")
        encoded.append([index[value] for value in values])
    if training:
        require_two_classes(names, where[0])
    return encoded[0], encoded[1], names


# ------------------------------------------------------------------------------ datasets


class DatasetImages:
    """Reader of items ``"<part>[<row>]"``: the image column of one or more `datasets.Dataset` parts.

    The column is read undecoded (``Image(decode=False)``): a row gives the encoded bytes (or, for
    datasets that only reference files, a path). The scan cache is keyed by the parts' Arrow files;
    its verdicts are stamped with each row's SHA-256, so a reordered or edited dataset is rescanned,
    never misread (each scan hashes every row's bytes again: a few seconds per GB).
    """

    def __init__(self, parts: dict, column: str):
        import datasets

        self.column = column
        self.parts = {}
        for name, dataset in parts.items():
            if column not in dataset.column_names:
                raise DataError(f"{name} has no column {column!r} (columns: {dataset.column_names}); "
                                "set image_column (--image-column)")
            try:
                self.parts[name] = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
            except (TypeError, ValueError, NotImplementedError) as error:  # pyarrow's cast errors among them
                raise DataError(f"{name}: column {column!r} does not hold images ({error}); "
                                "set image_column (--image-column)") from error
        files = [entry["filename"] for part in self.parts.values() for entry in part.cache_files]
        in_memory = any(not part.cache_files for part in self.parts.values())
        self.cache_key = None if in_memory or not files else os.path.abspath(files[0])

    def items(self, part: str) -> list[str]:
        return [f"{part}[{row}]" for row in range(len(self.parts[part]))]

    def _value(self, item: str) -> bytes | str | None:
        """A row's encoded bytes, or the path of the file it references (None: no image)."""
        part, _, row = item.rpartition("[")
        value = self.parts[part][int(row[:-1])][self.column]
        if value is None:
            return None
        return value["bytes"] if value.get("bytes") is not None else value.get("path")

    def open(self, item: str):
        value = self._value(item)
        if value is None:
            raise DataError(f"cannot read image {item}: the row has no image. Drop the row "
                            "(or pass --skip-bad-images to train on the rest).")
        return named_bytes(value, item) if isinstance(value, bytes) else value

    def stamp(self, item: str) -> list:
        value = self._value(item)
        if isinstance(value, bytes):
            return [hashlib.sha256(value).hexdigest()]
        return file_stamp(value) if value and os.path.isfile(value) else [None]

    def check(self, item: str) -> tuple[str | None, str | None]:
        value = self._value(item)
        if value is None:
            return "the row has no image", None
        if isinstance(value, bytes):
            return check_bytes(value, item)
        return check_file(value) if os.path.isfile(value) else (f"file {value} does not exist", None)


def _labels_of(dataset, column: str, place: str) -> tuple[list, list[str] | None]:
    """A label column's values, and its class names when it is a ClassLabel."""
    import datasets

    feature = dataset.features.get(column)
    if feature is None:
        raise DataError(f"{place} has no column {column!r} (columns: {dataset.column_names}); "
                        "set label_column (--label-column)")
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return list(dataset.select_columns([column])[:][column]), names  # one batch read, not row by row


def read_datasets(parts: dict, image_column: str = "image", label_column: str = "label",
                  description: dict | None = None, training: bool = True) -> Source:
    """``parts``: {"<name of train>": Dataset, optionally "<name of val>": Dataset}, in that order.
    ``training``: two classes at least are required."""
    names = list(parts)
    train_values, train_names = _labels_of(parts[names[0]], label_column, names[0])
    val_values, val_names = (_labels_of(parts[names[1]], label_column, names[1]) if len(names) > 1 else (None, None))
    if train_names is not None and val_names is not None and val_names != train_names:
        raise DataError(f"{names[1]} has classes {val_names} but {names[0]} has {train_names}")
    if train_names is not None and val_values is not None and val_names is None:
        val_values = [train_names.index(v) if v in train_names else v for v in val_values]  # names -> ClassLabel ids
    train_labels, val_labels, classes = encode_labels(train_values, val_values, train_names,
                                                      (names[0], names[-1]), training=training)
    reader = DatasetImages(parts, image_column)
    val = Labeled(reader.items(names[1]), val_labels) if len(names) > 1 else None
    return Source(Labeled(reader.items(names[0]), train_labels), val, classes, reader, description or {})


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_folder(folder: Path):
    """``datasets.load_dataset`` of a local folder of data files. datasets reads the folder's path as a glob
    pattern, so a path with ``[``, ``]``, ``*`` or ``?`` is escaped and its files are listed here the way
    load_dataset lists them: ``data[1]/`` is read as itself, never as ``data1/``."""
    import datasets

    if not any(character in str(folder.resolve()) for character in "[]*?"):
        return datasets.load_dataset(str(folder))
    try:  # datasets' own listing helpers: not public API, so a release may move them
        from datasets.data_files import DataFilesDict, get_data_patterns
        from datasets.load import infer_module_for_data_files
    except ImportError as error:
        raise DataError(f"dataset folder {folder}: this datasets release cannot read a folder whose path has "
                        f"[, ], * or ? as itself ({error}); rename the folder without them") from error
    base = glob.escape(str(folder.resolve()))
    files = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    module, options = infer_module_for_data_files(files)
    return datasets.load_dataset(module, data_files={split: [glob.escape(file) for file in found]
                                                     for split, found in files.items()}, **options)


def load_splits(name_or_path: str) -> dict:
    """{split: Dataset} of a Hub name, a local folder of parquet/arrow files, or a save_to_disk folder."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(name_or_path)
    try:
        if path.is_dir() and _is_saved_to_disk(path):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = _load_folder(path)
        else:
            loaded = datasets.load_dataset(str(name_or_path))
    except (OSError, ValueError) as error:
        if path.exists():
            raise DataError(f"cannot read dataset {name_or_path}: {error}. Expected a folder of parquet/arrow "
                            "files or a folder written by save_to_disk.") from error
        raise DataError(f"cannot load dataset {name_or_path!r} from the Hugging Face Hub ({error}). A Hub name "
                        f"needs internet access (and HF_DATASETS_OFFLINE unset); offline, use {OFFLINE_ALTERNATIVES}."
                        ) from error
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _check_split(splits: dict, name_or_path: str, wanted: str | None, setting: str) -> None:
    if wanted is not None and wanted not in splits:
        raise DataError(f"dataset {name_or_path} has no split {wanted!r} (splits: {sorted(splits)}); set {setting}")


def _splits_with(name_or_path: str, wanted: str, setting: str) -> dict:
    """:func:`load_splits`, with the ``wanted`` split checked; one unnamed split (a saved Dataset) is taken as it."""
    splits = load_splits(name_or_path)
    if len(splits) == 1 and wanted not in splits:
        splits = {wanted: next(iter(splits.values()))}
    _check_split(splits, name_or_path, wanted, setting)
    return splits


def read_hub(name_or_path: str, image_column: str = "image", label_column: str = "label", train_split: str = "train",
             val_split_name: str | None = None) -> Source:
    """A dataset's ``train_split`` and its val split: ``val_split_name``, or "validation" if it has one."""
    splits = _splits_with(name_or_path, train_split, "train_split (--train-split)")
    _check_split(splits, name_or_path, val_split_name, "val_split_name (--val-split-name)")
    if val_split_name == train_split:
        raise DataError(f"dataset {name_or_path}: val_split_name and train_split are both {train_split!r}; "
                        "validating on the training images measures nothing")
    val_name = val_split_name if val_split_name is not None else ("validation" if "validation" in splits else None)
    parts = {f"{name_or_path}:{train_split}": splits[train_split]}
    if val_name is not None:
        parts[f"{name_or_path}:{val_name}"] = splits[val_name]
    description = {"dataset": str(name_or_path), "train_split": train_split, "val_split_name": val_name,
                   "image_column": image_column, "label_column": label_column}
    return read_datasets(parts, image_column, label_column, description)


def read_split(name_or_path: str, split: str, image_column: str = "image", label_column: str = "label") -> Source:
    """One labelled split of a dataset as the source's ``train`` part (the images to evaluate): no other
    split's labels are read or checked, and one class is enough."""
    splits = _splits_with(name_or_path, split, "the split (--split)")
    description = {"dataset": str(name_or_path), "split": split, "image_column": image_column,
                   "label_column": label_column}
    return read_datasets({f"{name_or_path}:{split}": splits[split]}, image_column, label_column, description,
                         training=False)


def dataset_images(name_or_path: str, split: str = "train", image_column: str = "image") -> tuple[list[str], DatasetImages]:
    """The items of one split of a dataset, and their reader: unlabelled images to predict."""
    splits = _splits_with(name_or_path, split, "the split (--split)")
    name = f"{name_or_path}:{split}"
    reader = DatasetImages({name: splits[split]}, image_column)
    return reader.items(name), reader


# ----------------------------------------------------------------------------------- csv


def _csv_rows(csv_file: str, image_root: Path) -> tuple[list[str], list[str], list[int]]:
    """Paths (resolved against ``image_root``), label strings and line numbers; errors name the file and line."""
    if not os.path.isfile(csv_file):
        raise DataError(f"csv file {csv_file} does not exist (expected rows of path,label)")
    paths, labels, lines = [], [], []
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would glue onto the header
        with open(csv_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                where = f"{csv_file} line {reader.line_num}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if reader.line_num == 1 and [cell.strip().lower() for cell in row] == ["path", "label"]:
                    continue  # header
                if len(row) != 2:
                    raise DataError(f"{where}: expected 2 columns (path,label), got {len(row)}: {row}")
                # a path is taken as written when that file exists (names may start or end with spaces)
                relative = row[0] if (image_root / row[0]).is_file() else row[0].strip()
                label = row[1].strip()
                if not label:
                    raise DataError(f"{where}: empty label for {relative}; fill it in or drop the row")
                path = image_root / relative
                if not path.is_file():
                    raise DataError(f"{where}: image {path} does not exist (paths are relative to image_root "
                                    f"{image_root}, --image-root)")
                paths.append(str(path))
                labels.append(label)
                lines.append(reader.line_num)
    except UnicodeDecodeError as error:
        raise DataError(f"csv file {csv_file} is not UTF-8 text ({error}); save it as UTF-8 (Excel: CSV UTF-8)"
                        ) from error
    if not paths:
        raise DataError(f"csv file {csv_file} has no rows (expected path,label)")
    return paths, labels, lines


def read_csv(csv_file: str, image_root: str | None = None, val_csv: str | None = None) -> Source:
    """``path,label`` rows (an optional ``path,label`` header), paths relative to ``image_root``
    (default: the folder of ``csv_file``); class names are the sorted labels."""
    root = Path(image_root) if image_root is not None else Path(csv_file).parent
    if not root.is_dir():
        raise DataError(f"image_root {root} does not exist (--image-root)")
    train_paths, train_values, train_lines = _csv_rows(csv_file, root)
    val_paths, val_values, val_lines = _csv_rows(val_csv, root) if val_csv is not None else (None, None, None)
    train_labels, val_labels, classes = encode_labels(train_values, val_values, None, (csv_file, str(val_csv)),
                                                      (train_lines, val_lines))
    val = Labeled(val_paths, val_labels) if val_paths is not None else None
    description = {"train_csv": str(csv_file), "val_csv": val_csv, "image_root": str(root)}
    return Source(Labeled(train_paths, train_labels), val, classes, FileImages(root), description)
