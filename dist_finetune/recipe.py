"""The run recipe: a :class:`RunConfig` in, the three Flash steps (data, task, finetune) out.

The CLI and the demo call this; Python users usually write the three steps themselves.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from .config import RunConfig
from .errors import ConfigError
from .data import ImageClassificationData
from .task import ImageClassifier
from .trainer import Trainer


def finetune_from_config(config: RunConfig, resume: str | None = None) -> tuple[Trainer, ImageClassifier, list[dict]]:
    """The three steps (data, task, finetune) driven by a :class:`RunConfig`; the CLI calls this."""
    if not config.data.train_folder:
        raise ConfigError("no training data: set data.train_folder (--train-folder)")
    data_config, model_config, strategy_config = config.data, config.model, config.strategy
    data = ImageClassificationData.from_folders(
        train_folder=data_config.train_folder,
        valid_folder=data_config.val_folder,
        val_split=data_config.val_split,
        image_size=data_config.image_size,
        batch_size=data_config.batch_size,
        num_workers=data_config.num_workers,
        augment=data_config.augment,
        seed=config.trainer.seed,
        skip_bad_images=data_config.skip_bad_images,
    )
    set_seed(config.trainer.seed)  # the new head's initialisation
    task = ImageClassifier(
        num_classes=data.num_classes,
        backbone=model_config.backbone,
        pretrained=model_config.pretrained,
        weights=model_config.weights,
        head_hidden=model_config.head_hidden,
        head_dropout=model_config.head_dropout,
    )
    trainer = Trainer(config.trainer)
    metrics = trainer.finetune(task, data, strategy=strategy_config.strategy(), train_bn=strategy_config.train_bn,
                               resume=resume)
    return trainer, task, metrics
