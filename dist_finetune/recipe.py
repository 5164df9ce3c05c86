"""The run recipe: a :class:`RunConfig` in, the three Flash steps (data, task, finetune) out.

The CLI and the demo call this; Python users usually write the three steps themselves.
"""

from __future__ import annotations

import dataclasses

from accelerate.utils import set_seed

from .config import RunConfig
from .errors import ConfigError
from .data import ImageClassificationData
from .evaluation import format_report
from .lr_finder import LRFinderResult, LRSweep
from .reports import evaluation_data, save_report
from .run_records import dry_run as plan_run
from .task import ImageClassifier
from .trainer import Trainer


def finetune_from_config(config: RunConfig, resume: str | None = None,
                         dry_run: bool = False) -> tuple[Trainer, ImageClassifier, list[dict] | str]:
    """The three steps (data, task, finetune) driven by a :class:`RunConfig`; the CLI calls this.

    ``resume``: replaces ``config.trainer.resume`` when given.
    ``dry_run``: build and check everything, train nothing; the third item is then the plan (text).
    Written into the output dir besides the training's own files: ``config.yaml``, ``run_info.json``.
    """
    if resume is not None:
        config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, resume=resume))
    data = build_data(config)
    task = build_task(config, data)
    trainer = Trainer(config)
    if dry_run:
        return trainer, task, plan_run(trainer, task, data, config.strategy.strategy())
    metrics = trainer.finetune(task, data, strategy=config.strategy.strategy())
    return trainer, task, metrics


def lr_find_from_config(config: RunConfig, sweep: LRSweep) -> tuple[Trainer, LRFinderResult]:
    """``Trainer.lr_find`` on the data, model and strategy ``finetune_from_config`` would train; the CLI calls
    this. Writes ``lr_find.json`` (and ``.png``) to ``config.trainer.output_dir`` when set."""
    data = build_data(config)
    trainer = Trainer(config)
    return trainer, trainer.lr_find(build_task(config, data), data, strategy=config.strategy.strategy(), sweep=sweep)


def build_task(config: RunConfig, data: ImageClassificationData) -> ImageClassifier:
    """The model section's classifier for ``data``'s classes, its new head seeded by ``trainer.seed``."""
    model = config.model
    set_seed(config.trainer.seed)  # the new head's initialisation
    return ImageClassifier(num_classes=data.num_classes, backbone=model.backbone, pretrained=model.pretrained,
                           weights=model.weights, head_hidden=model.head_hidden, head_dropout=model.head_dropout)


def build_data(config: RunConfig) -> ImageClassificationData:
    """The data section's one source (image folders, a `datasets` dataset, or csv files) as training data."""
    data = config.data
    settings = dict(val_split=data.val_split, seed=config.trainer.seed, image_size=data.image_size,
                    batch_size=data.batch_size, num_workers=data.num_workers, augment=data.augment,
                    augment_policy=data.augment_policy, skip_bad_images=data.skip_bad_images, dedupe=data.dedupe,
                    class_weights=data.class_weights, balanced_sampler=data.balanced_sampler, scan=data.scan)
    if data.dataset:
        return ImageClassificationData.from_hub(data.dataset, data.image_column, data.label_column, data.train_split,
                                                data.val_split_name, **settings)
    if data.train_csv:
        return ImageClassificationData.from_csv(data.train_csv, data.image_root, data.val_csv, **settings)
    if data.train_folder:
        return ImageClassificationData.from_folders(data.train_folder, data.val_folder, **settings)
    raise ConfigError("no training data: set data.train_folder (--train-folder), data.dataset (--dataset) or "
                      "data.train_csv (--train-csv)")


def evaluate_checkpoint(checkpoint: str, source, output_dir: str | None = None, batch_size: int = 32,
                        num_workers: int | None = None, top_losses: int = 10, tta: str = "none") -> dict:
    """The evaluation report of a saved model on ``source`` (``reports.evaluation_source``), printed and
    (main process) written to ``output_dir``; works under ``accelerate launch`` (each image counted once).
    ``tta``: test-time augmentation (``augment.TTA_MODES``)."""
    task = ImageClassifier.load_from_checkpoint(checkpoint)
    data = evaluation_data(source, task.labels, task.image_size, batch_size, num_workers)
    trainer = Trainer(progress_bar=False, tta=tta)
    report = trainer.evaluate(task, data, top_losses)
    report["model"] = {"checkpoint": str(checkpoint), **({"tta": tta} if tta != "none" else {})}
    report["data"] = source.description
    if trainer.accelerator.is_main_process and output_dir:
        save_report(report, output_dir, print)
    elif trainer.accelerator.is_main_process:
        print(format_report(report))
    return report
