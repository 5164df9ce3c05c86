"""What a run shows at its end: the validation report of the model it ends with and its training curves.

The report (``evaluation.build_report``) comes from every validation image's logits, gathered over
the processes in dataset order, each image once; files are written by the main process only:
``report.json``, ``confusion_matrix.csv``, ``confusion_matrix.png`` and ``curves.png`` (the PNGs
need matplotlib, an optional extra: without it the rest is written and the install hint printed).
The same report of any saved model on any image folder: ``dist-finetune evaluate``.
"""

from __future__ import annotations

from pathlib import Path

from .callbacks import Callback, RunState
from .data import ImageClassificationData
from .errors import ConfigError, DataError
from .evaluation import build_report, format_report, write_report
from .images import FileImages, scan_cache_file, scan_images
from .inference import collect_outputs
from .plots import MATPLOTLIB_HINT, matplotlib_available, plot_curves
from .sources import Labeled, Source, read_split, scan_folder

def validation_report(task, loader, accelerator, data: ImageClassificationData, top_losses: int = 10,
                      tta: str = "none") -> dict:
    """The report of ``task`` on ``data``'s val images through ``loader`` (prepared, unshuffled), on every rank;
    ``tta``: test-time augmentation (``augment.tta_logits``)."""
    logits, labels = collect_outputs(task, loader, accelerator, tta)
    if labels.tolist() != list(data.val_labels):  # the order the paths are named in must be the loader's
        raise RuntimeError(f"gathered {len(labels)} labels that do not match the {len(data.val_labels)} "
                           "validation images in order; was the loader shuffled?")
    return build_report(labels, logits, data.classes, paths=data.val_paths, top_losses=top_losses)


def save_report(report: dict, output_dir, say, curves: bool = False) -> list[Path]:
    """Write the report's files (and ``curves.png`` of the run in ``output_dir``); say where they are.

    Main process only. Without matplotlib the PNGs are skipped and the install hint said once.
    """
    written = write_report(report, output_dir)
    if curves and matplotlib_available():
        written.append(plot_curves(output_dir))
    say(format_report(report))  # above a few dozen classes: the worst classes and most confused pairs
    say(f"report written: {', '.join(str(path) for path in written)}")
    if not matplotlib_available():
        say(f"{MATPLOTLIB_HINT} (confusion_matrix.png{' and curves.png' if curves else ''} skipped)")
    return written


def evaluation_source(data_folder: str | None = None, dataset: str | None = None, split: str = "test",
                      image_column: str = "image", label_column: str = "label") -> Source:
    """The images to evaluate, as its ``train`` part: ``data_folder/<class>/*``, or one split of a
    `datasets` dataset (a Hub name, a folder of parquet/arrow files or a ``save_to_disk`` folder), read
    alone. Any subset of the model's classes may be present, a single class included."""
    if (data_folder is None) == (dataset is None):
        raise ConfigError("evaluate takes one of data_folder (--data-folder) or dataset (--dataset)")
    if dataset is not None:
        return read_split(dataset, split, image_column, label_column)
    paths, labels, classes = scan_folder(data_folder, "evaluation")
    return Source(Labeled(paths, labels), None, classes, FileImages(data_folder), {"folder": str(data_folder)})


def evaluation_data(source: Source, classes: list[str], image_size: int, batch_size: int = 32,
                    num_workers: int | None = None) -> ImageClassificationData:
    """``source``'s images as the val split of data labelled by ``classes`` (a model's; the source may
    hold a subset of them). Every image is decoded first: an unreadable one stops it, named."""
    unknown = sorted(set(source.classes) - set(classes))
    if unknown:
        raise DataError(f"the images to evaluate have class(es) {unknown} the model does not know; its classes are "
                        f"{classes}")
    items, reader = list(source.train.items), source.reader
    problems = scan_images(items, scan_cache_file(reader.cache_key) if reader.cache_key else None, reader)
    if problems:
        item, problem = sorted(problems.items())[0]
        raise DataError(f"cannot read image {item}: {problem} ({len(problems)} unreadable): remove or replace it")
    labels = [classes.index(source.classes[label]) for label in source.train.labels]
    return ImageClassificationData([], [], items, labels, list(classes), image_size, batch_size, num_workers,
                                   augment=False, source=source.description, reader=reader)


class Reports(Callback):
    """At the end of training: the validation report of the weights the task ends with (the best
    epoch's unless ``load_best_model_at_end=False``) and ``curves.png``, into the output dir."""

    def __init__(self, top_losses: int = 10):
        self.top_losses = top_losses

    def on_fit_end(self, trainer, run: RunState) -> None:
        if run.output_dir is None or not run.history:
            return
        report = validation_report(run.task, run.val_loader, run.accelerator, run.data, self.top_losses,
                                   run.config.tta)
        best = [record for record in run.history if record.get("best")]
        epoch = run.history[-1]["epoch"] if run.model_epoch is None else run.model_epoch
        live_best = bool(best) and epoch == best[-1]["epoch"] and best[-1].get("best_weights", "live") == "live"
        report["model"] = {"epoch": epoch, "weights": "best (EMA)" if run.model_is_ema else
                           "best" if live_best else "last"}
        if run.is_main_process:
            trainer.announce(f"validation report of epoch {epoch}'s weights:")
            save_report(report, run.output_dir, trainer.announce, curves=True)
