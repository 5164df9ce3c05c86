"""Batch prediction: every image labelled exactly once, in input order, streamed to CSV or JSONL.

- Decoding runs in DataLoader workers with the validation pipeline (``load_rgb``'s draft decode at
  ``eval_resize_size``, then ``eval_transform``), so ``predict`` and ``validate`` see identical pixels
  and give identical logits. An unreadable file never raises there: it becomes a placeholder image
  flagged unreadable (its logits are ignored), and the main process words the problem.
- Under ``accelerate launch`` each rank runs every Nth batch (``prepare_data_loader``); one
  ``gather_for_metrics`` per batch hands the main process N consecutive batches in input order,
  which it writes and flushes at once. Only the K best probabilities and classes and each row's
  (input index, readable) cross processes, as tensors; the indices are checked, so a row can never
  be lost, repeated or moved. Memory does not grow with the number of files (except the path list),
  and a killed run leaves every finished batch on disk.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .augment import TTA_MODES, eval_resize_size, eval_transform, tta_logits
from .data import default_num_workers
from .distributed import from_main_process, launcher_mixed_precision, local_world_size
from .errors import ConfigError, DataError, check_choice
from .host_memory import keep_freed_memory
from .images import IMAGE_EXTENSIONS, FileImages, list_image_files, load_rgb
from .memory_format import channels_last_by_default

CSV_COLUMNS = ("path", "label", "probability", "error")
UNREADABLE_EXIT_CODE = 3  # `predict --strict` when any file could not be read (its rows are still written)
AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Prediction:
    """One input file's result; an unreadable file has ``label`` None and an ``error``."""

    path: str
    label: str | None
    probability: float | None
    top_k: tuple[tuple[str, float], ...] = ()  # the K best (label, probability), best first
    error: str | None = None


# ------------------------------------------------------------------------ device, precision


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): the GPU when CUDA is available, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but torch sees no CUDA device: use --device cpu (or auto)")
    return device


def model_device(task: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else where the model is, or the GPU (when there is one) for a model on the CPU."""
    if device is not None:
        return select_device(device)
    current = next(task.parameters()).device
    return current if current.type != "cpu" else select_device("auto")


def launcher_device(accelerator, device: str | torch.device | None) -> torch.device:
    """Under a launcher every process uses the device it was given; a different ``--device`` is refused."""
    if device is None or str(device) == "auto" or torch.device(device).type == accelerator.device.type:
        return accelerator.device
    raise ConfigError(
        f"--device {device} conflicts with the launcher, which gave this process {accelerator.device}: under "
        "accelerate launch drop --device (for CPU processes launch with --cpu or ACCELERATE_USE_CPU=1)"
    )


def autocast_dtype(mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of ``"bf16"``/``"fp16"``; None (float32) for ``"no"`` or None."""
    check_choice("mixed_precision", mixed_precision, tuple(AUTOCAST_DTYPES), unset_allowed=True)
    return AUTOCAST_DTYPES.get(mixed_precision)


# ---------------------------------------------------------------------------------- inputs


def expand_inputs(items: Sequence[str | os.PathLike], list_file: str | os.PathLike | None = None) -> list[str]:
    """Image paths in the order given, each folder expanded (recursively, sorted); then ``list_file``'s
    lines, one image path each, taken as they are (a missing one becomes an error row, not a stop)."""
    paths: list[str] = []
    missing = [str(item) for item in items if not Path(item).exists()]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"input {missing[0]} does not exist{more}: pass image files or folders")
    for item in items:
        paths += list_image_files(item) if Path(item).is_dir() else [str(item)]
    if list_file is not None:
        try:
            lines = Path(list_file).read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not a path
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read the list of paths {list_file} (UTF-8 text, one path a line): {error}"
                            ) from error
        paths += [line.strip() for line in lines if line.strip()]
    if not paths:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {[str(i) for i in items]}"
                        + (f" or {list_file}" if list_file else ""))
    return paths


def shared_inputs(accelerator, items: Sequence[str], list_file: str | None = None) -> list[str]:
    """:func:`expand_inputs` run by the main process and sent to every rank: all ranks shard one list
    even if a folder changes while it is listed."""
    if accelerator is None or accelerator.num_processes == 1:
        return expand_inputs(items, list_file)
    listing: list[str] | DataError | None = None
    if accelerator.is_main_process:
        try:
            listing = expand_inputs(items, list_file)
        except DataError as error:  # every rank must raise it, not wait for a list
            listing = error
    listing = from_main_process(accelerator, listing)
    if isinstance(listing, DataError):
        raise listing
    return listing


# ------------------------------------------------------------------------------ decoding


class PredictionDataset(Dataset):
    """``(uint8 image, index, readable)`` per item, decoded exactly as the validation set is.

    Items are file paths, or whatever ``reader`` opens (a dataset's rows, see ``sources``). Never
    raises on a bad item: it yields a black placeholder (so batches keep their shape) with
    ``readable`` False.
    """

    def __init__(self, paths: Sequence[str], image_size: int, reader=None):
        self.paths = paths
        self.reader = reader or FileImages()
        self.transform = eval_transform(image_size)
        self.min_side = eval_resize_size(image_size)
        self.placeholder = torch.zeros(3, image_size, image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.transform(load_rgb(self.reader.open(self.paths[index]), self.min_side)), index, True
        except DataError:
            return self.placeholder, index, False


def prediction_loader(paths: Sequence[str], image_size: int, batch_size: int, num_workers: int | None = None,
                      pin_memory: bool = False, local_processes: int = 1, reader=None) -> DataLoader:
    """Batches in input order. Workers (default: from the CPU cores) only when there is more than one batch."""
    if num_workers is None:
        num_workers = default_num_workers(local_processes) if len(paths) > batch_size else 0
    return DataLoader(PredictionDataset(paths, image_size, reader), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers > 0 else None)


def unreadable_reason(item: str, reader=None) -> str:
    """Why ``item`` could not be predicted (decoded again on the main process: bad files are rare)."""
    return (reader or FileImages()).check(item)[0] or "could not be decoded"


# ------------------------------------------------------------------------------ predicting


def effective_top_k(task, top_k: int) -> int:
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    return min(top_k, task.num_classes)


def predict_batches(task, paths: Sequence[str], batch_size: int = 32, top_k: int = 1,
                    device: str | torch.device | None = None, mixed_precision: str | None = None,
                    num_workers: int | None = None, accelerator=None, reader=None,
                    tune_cpu_allocator: bool = True, tta: str = "none") -> Iterator[list[Prediction]]:
    """Predictions batch by batch in input order: the rows on the main process, ``[]`` on other ranks.

    ``paths``: image files, or the items ``reader`` opens (a dataset split, see ``sources.dataset_images``).

    Every rank must consume the whole iterator (each batch is a collective). ``accelerator``: shard
    the batches over its processes, on its device (``device`` must agree); without it one process
    runs on ``device`` (see :func:`model_device`), moving ``task`` there. ``mixed_precision``:
    ``"bf16"``/``"fp16"`` autocast (None: the accelerator's setting, else float32). Settings are
    checked on the call, before anything is decoded or written. ``tune_cpu_allocator``: on the CPU,
    let malloc keep freed memory for the next batch (see ``host_memory``). ``tta``: ``"flip"`` averages the
    probabilities of each image and its mirror image (``augment.tta_logits``).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    check_choice("tta (--tta)", tta, TTA_MODES)
    top_k = effective_top_k(task, top_k)
    if accelerator is not None:
        target = launcher_device(accelerator, device)
        precision = mixed_precision or accelerator.mixed_precision
        local = local_world_size(accelerator)
    else:
        target, precision, local = model_device(task, device), mixed_precision or launcher_mixed_precision(), 1
        if target.type == "cuda" and target.index is not None:
            torch.cuda.set_device(target)  # pinned batches go to this GPU's context, not a new one on cuda:0
    dtype = autocast_dtype(precision)
    if target.type == "cpu" and tune_cpu_allocator:
        keep_freed_memory()
    loader = prediction_loader(paths, task.image_size, batch_size, num_workers, target.type == "cuda", local, reader)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    return _prediction_stream(task, paths, loader, target, dtype, top_k, accelerator, reader, tta)


def _prediction_stream(task, paths: Sequence[str], loader, target: torch.device, dtype: torch.dtype | None,
                       top_k: int, accelerator, reader, tta: str) -> Iterator[list[Prediction]]:
    main = accelerator is None or accelerator.is_main_process
    channels_last = channels_last_by_default(task, target)
    was_training = task.training
    task.to(target, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    task.eval()
    done = 0
    try:
        for images, indices, readable in loader:
            with torch.inference_mode():
                images = images.to(target, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
                    logits = tta_logits(task, images, tta)
                scores, classes = logits.softmax(dim=1).topk(top_k, dim=1)
                status = torch.stack([indices, readable.long()], dim=1).to(target)
                if accelerator is not None:
                    scores, classes, status = accelerator.gather_for_metrics((scores, classes, status))
            if not main:
                yield []
                continue
            rows = _rows(task.labels, paths, done, scores.tolist(), classes.tolist(), status.tolist(), reader)
            done += len(rows)
            yield rows
        if main and done != len(paths):
            raise RuntimeError(f"prediction produced {done} rows for {len(paths)} files")
    finally:
        task.train(was_training)


def _rows(labels: list[str], paths: Sequence[str], start: int, scores: list, classes: list,
          status: list, reader) -> list[Prediction]:
    indices = [index for index, _ in status]
    if indices != list(range(start, start + len(indices))):
        raise RuntimeError(f"prediction rows out of order: expected {start}..., got {indices[:8]}")
    rows = []
    for (index, readable), row_scores, row_classes in zip(status, scores, classes):
        path = paths[index]
        if not readable:
            rows.append(Prediction(path, None, None, (), unreadable_reason(path, reader)))
            continue
        best = tuple((labels[c], s) for c, s in zip(row_classes, row_scores))
        rows.append(Prediction(path, best[0][0], best[0][1], best))
    return rows


def predict_paths(task, paths: Sequence[str], **settings) -> list[Prediction]:
    """Every prediction in memory (the Python API); an unreadable file raises :class:`DataError` here."""
    results: list[Prediction] = []
    with contextlib.closing(predict_batches(task, paths, **settings)) as batches:
        for rows in batches:
            bad = next((row for row in rows if row.error is not None), None)
            if bad is not None:
                raise DataError(f"cannot read image {bad.path}: {bad.error}. Remove or replace the file "
                                "(`dist-finetune predict` reports unreadable files as rows instead).")
            results += rows
    return results


# --------------------------------------------------------------------------------- writing


class PredictionWriter:
    """Rows to an open text file: one write and one flush per batch, so a killed run leaves whole rows."""

    def __init__(self, handle, top_k: int = 1):
        self.handle, self.top_k = handle, top_k

    def write(self, rows: Sequence[Prediction]) -> None:
        self.handle.write("".join(self.format(row) for row in rows))
        self.handle.flush()

    def format(self, row: Prediction) -> str:
        raise NotImplementedError


class CsvWriter(PredictionWriter):
    """``path,label,probability,error``; for K > 1 also ``label_2,probability_2, ..., label_K,probability_K``.

    An unreadable file: empty label and probability, the problem in ``error`` (empty when fine).
    """

    def __init__(self, handle, top_k: int = 1):
        super().__init__(handle, top_k)
        ranks = [f"{column}_{rank}" for rank in range(2, top_k + 1) for column in ("label", "probability")]
        self.handle.write(self._line([*CSV_COLUMNS, *ranks]))

    def format(self, row: Prediction) -> str:
        others = [value for label, score in row.top_k[1:] for value in (label, f"{score:.6f}")]
        others += [""] * (2 * (self.top_k - 1) - len(others))
        probability = "" if row.probability is None else f"{row.probability:.6f}"
        return self._line([row.path, row.label or "", probability, row.error or "", *others])

    @staticmethod
    def _line(values: list[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()


class JsonlWriter(PredictionWriter):
    """One object per line: ``path, label, probability, error`` (null when fine), and for K > 1
    ``top_k``, a list of ``{label, probability}`` best first (empty for an unreadable file)."""

    def format(self, row: Prediction) -> str:
        record = {"path": row.path, "label": row.label,
                  "probability": None if row.probability is None else round(row.probability, 6), "error": row.error}
        if self.top_k > 1:
            record["top_k"] = [{"label": label, "probability": round(score, 6)} for label, score in row.top_k]
        return json.dumps(record, ensure_ascii=False) + "\n"


WRITERS = {"csv": CsvWriter, "jsonl": JsonlWriter}
PREDICTION_FORMATS = tuple(WRITERS)


def output_format(output: str | None, requested: str | None = None) -> str:
    """``requested``, else ``jsonl`` for a ``.jsonl`` output file, else ``csv``."""
    if requested is not None:
        check_choice("format", requested, PREDICTION_FORMATS)
        return requested
    return "jsonl" if output and output.lower().endswith(".jsonl") else "csv"


@dataclass
class PredictionSummary:
    """What the main process wrote (all zeros on other ranks)."""

    images: int = 0
    unreadable: int = 0
    first_unreadable: str | None = None  # "path: problem"
    seconds: float = 0.0

    def add(self, rows: Sequence[Prediction]) -> None:
        self.images += len(rows)
        for row in rows:
            if row.error is not None:
                self.unreadable += 1
                self.first_unreadable = self.first_unreadable or f"{row.path}: {row.error}"


def predict_to_file(task, paths: Sequence[str], output: str | None = None, fmt: str | None = None,
                    top_k: int = 1, progress: bool = True, **settings) -> PredictionSummary:
    """Stream the predictions of ``paths`` to ``output`` (stdout when None), in input order.

    Only the main process opens the output; every batch is written and flushed as it arrives.
    ``settings``: :func:`predict_batches`'s (batch_size, device, mixed_precision, num_workers, accelerator,
    reader, tune_cpu_allocator, tta).
    """
    accelerator = settings.get("accelerator")
    main = accelerator is None or accelerator.is_main_process
    writer_class = WRITERS[output_format(output, fmt)]
    top_k = effective_top_k(task, top_k)
    summary = PredictionSummary()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        batches = stack.enter_context(contextlib.closing(predict_batches(task, paths, top_k=top_k, **settings)))
        writer = None
        if main:
            handle = sys.stdout if output is None else stack.enter_context(open(output, "w", newline="",
                                                                                encoding="utf-8"))
            writer = writer_class(handle, top_k)
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc="predict", disable=not (main and progress),
                                       dynamic_ncols=True))
        for rows in batches:
            if writer is not None:
                writer.write(rows)
                summary.add(rows)
                bar.update(len(rows))
    summary.seconds = time.perf_counter() - start
    return summary
