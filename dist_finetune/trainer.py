"""The finetuning loop: ``Trainer(max_epochs=10).finetune(task, data, strategy="freeze_unfreeze")``.

Reads top to bottom: resolve the strategy, freeze, build optimizer and loaders, prepare with
Accelerate, then per epoch: strategy transition -> (DDP resync, rank check) -> train -> validate
-> log. Everything device-, precision- and process-specific goes through the Accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig, TrainerConfig
from .data import ImageClassificationData
from .distributed import (
    DDPResync,
    broadcast_buffers,
    check_rank_consistency,
    make_accelerator,
    refuse_freezing_under_sharding,
)
from .finetuning import BaseFinetuning, NoFreeze, resolve_strategy, trainable_parameters
from .schedule import WarmupSchedule
from .task import ImageClassifier

MODEL_FILENAME = "model.safetensors"
METRICS_FILENAME = "metrics.jsonl"


class Trainer:
    """Finetunes an :class:`ImageClassifier`; settings are :class:`TrainerConfig` fields."""

    def __init__(self, config: TrainerConfig | None = None, **settings):
        base = dataclasses.asdict(config) if config is not None else {}
        self.config = TrainerConfig(**{**base, **settings})
        self.accelerator = None
        self.model = None  # the prepared (possibly DDP-wrapped) model of the last finetune
        self.task: ImageClassifier | None = None
        self.metrics: list[dict] = []

    # ----------------------------------------------------------------------------- public

    def finetune(self, task: ImageClassifier, data: ImageClassificationData, strategy="no_freeze",
                 train_bn: bool = True) -> list[dict]:
        """Train ``task`` on ``data`` with a strategy; returns one metrics dict per epoch."""
        config = self.config
        strategy = resolve_strategy(strategy, train_bn=train_bn)
        strategy.validate(config.max_epochs)
        _check_image_size(task, data)
        accelerator = self._accelerator()
        refuse_freezing_under_sharding(accelerator, freezes=not isinstance(strategy, NoFreeze))
        set_seed(config.seed)

        task.labels, task.image_size = list(data.classes), data.image_size
        strategy.freeze_before_training(task)
        optimizer = self._build_optimizer(task)
        train_loader, val_loader = self._loaders(data, accelerator)
        if self._use_channels_last(task, accelerator):
            task.to(memory_format=torch.channels_last)
        model, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
        steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
        schedule = WarmupSchedule(optimizer, steps_per_epoch * config.max_epochs,
                                  round(config.warmup_epochs * steps_per_epoch), config.scheduler)
        accelerator.register_for_checkpointing(schedule)
        resync = DDPResync(accelerator, model)
        self.task, self.model, self.metrics = task, model, []
        self._start_metrics_file()

        for epoch in range(config.max_epochs):
            model = self._apply_strategy(strategy, task, epoch, optimizer, resync)
            self.model = model
            train_stats = self._train_epoch(model, optimizer, schedule, train_loader, epoch)
            broadcast_buffers(task)  # every rank validates (and later saves) rank 0's BN statistics
            val_stats = self._evaluate(task, val_loader)
            self._log({"epoch": epoch, **train_stats, **val_stats,
                       "lr": [group["lr"] for group in optimizer.param_groups]})

        if config.check_rank_consistency:
            check_rank_consistency(accelerator, model, optimizer, "at the end of training")
        if config.output_dir:
            self.save_checkpoint(Path(config.output_dir) / MODEL_FILENAME)
        return self.metrics

    def validate(self, task: ImageClassifier, data: ImageClassificationData) -> dict:
        """Validation loss and accuracy of ``task`` on ``data``'s val images (each counted once)."""
        accelerator = self.accelerator or self._accelerator()
        loader = accelerator.prepare_data_loader(data.dataloader(data.val_dataset(), shuffle=False,
                                                                 local_processes=accelerator.num_processes))
        task.to(accelerator.device)
        return self._evaluate(task, loader)

    def predict(self, task: ImageClassifier, paths, batch_size: int = 32):
        """Labels for a path, a list of paths, or a folder (see :meth:`ImageClassifier.predict`)."""
        return task.predict(paths, batch_size=batch_size)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the finetuned model (weights + metadata, safetensors) from the main process only."""
        if self.task is None:
            raise RuntimeError("save_checkpoint needs a model: call finetune first")
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.task.save_checkpoint(path)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------ setup

    def _accelerator(self):
        config = self.config
        self.accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, config.seed)
        return self.accelerator

    def _build_optimizer(self, task: ImageClassifier) -> torch.optim.Optimizer:
        params = trainable_parameters(task)
        if not params:
            raise ValueError("nothing to train: the strategy froze every parameter before training")
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def _loaders(self, data: ImageClassificationData, accelerator):
        processes = accelerator.num_processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        global_batch = data.batch_size * processes
        if len(data.train_paths) < global_batch:
            raise ValueError(
                f"{len(data.train_paths)} training images but one step needs batch_size {data.batch_size} x "
                f"{processes} process(es) = {global_batch}: lower batch_size or add images"
            )
        pin = accelerator.device.type == "cuda"
        train = data.dataloader(data.train_dataset(), shuffle=True, local_processes=local, pin_memory=pin,
                                drop_last=True, seed=self.config.seed)
        val = data.dataloader(data.val_dataset(), shuffle=False, local_processes=local, pin_memory=pin)
        return train, val

    def _use_channels_last(self, task: ImageClassifier, accelerator) -> bool:
        if self.config.channels_last is not None:
            return self.config.channels_last
        return task.is_convnet and accelerator.device.type == "cuda"

    # ----------------------------------------------------------------------------- epochs

    def _apply_strategy(self, strategy: BaseFinetuning, task, epoch: int, optimizer, resync: DDPResync):
        """Run the strategy's epoch hook; re-sync DDP and check the ranks if it changed anything."""
        groups_before = len(optimizer.param_groups)
        strategy.call_finetune_function(task, epoch, optimizer)
        changed = len(optimizer.param_groups) != groups_before or resync.changed()
        if changed and self.config.check_rank_consistency:
            # before the DDP rebuild, whose broadcast from rank 0 would hide a rank that drifted
            check_rank_consistency(self.accelerator, task, optimizer, f"after the strategy transition at epoch {epoch}")
        return resync()

    def _train_epoch(self, model, optimizer, schedule: WarmupSchedule, loader, epoch: int) -> dict:
        accelerator, config = self.accelerator, self.config
        model.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        params = trainable_parameters(model)
        loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        seen = torch.zeros((), device=accelerator.device, dtype=torch.int64)
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=True if not (config.progress_bar and accelerator.is_main_process) else None)
        start = time.perf_counter()
        for images, labels in bar:
            if self._use_channels_last(self.task, accelerator):
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                schedule.step()
            loss_sum += loss.detach().double() * labels.numel()
            seen += labels.numel()
        totals = accelerator.reduce(torch.stack([loss_sum, seen.double()]), reduction="sum")
        elapsed = time.perf_counter() - start
        return {"train_loss": (totals[0] / totals[1]).item(), "train_images": int(totals[1].item()),
                "images_per_s": totals[1].item() / elapsed, "epoch_time_s": elapsed}

    @torch.no_grad()
    def _evaluate(self, task: ImageClassifier, loader) -> dict:
        """Loss and top-1 (top-5 above 5 classes) with every val image counted exactly once."""
        accelerator = self.accelerator
        was_training = task.training
        task.eval()
        top_k = 5 if task.num_classes > 5 else 1
        results = []
        for images, labels in loader:
            logits = task(images).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
            per_image = torch.stack([losses, hits[:, 0].double(), hits.any(dim=1).double()], dim=1)
            results.append(accelerator.gather_for_metrics(per_image.double()))
        task.train(was_training)
        totals = torch.cat(results).sum(dim=0) if results else torch.zeros(3)
        count = sum(len(r) for r in results)
        stats = {"val_loss": totals[0].item() / max(1, count), "val_acc": totals[1].item() / max(1, count),
                 "val_images": count}
        if top_k == 5:
            stats["val_top5"] = totals[2].item() / max(1, count)
        return stats

    # ---------------------------------------------------------------------------- logging

    def _start_metrics_file(self) -> None:
        if self.config.output_dir and self.accelerator.is_main_process:
            Path(self.config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.config.output_dir) / METRICS_FILENAME).write_text("")

    def _log(self, record: dict) -> None:
        self.metrics.append(record)
        if not self.accelerator.is_main_process:
            return
        lrs = ", ".join(f"{lr:.2e}" for lr in record["lr"])
        top5 = f" top5 {record['val_top5']:.3f}" if "val_top5" in record else ""
        tqdm.write(
            f"epoch {record['epoch']}: train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_acc {record['val_acc']:.3f}{top5}  {record['images_per_s']:.1f} img/s  lr [{lrs}]"
        )
        if self.config.output_dir:
            with open(Path(self.config.output_dir) / METRICS_FILENAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _check_image_size(task: ImageClassifier, data: ImageClassificationData) -> None:
    if task.fixed_image_size is not None and data.image_size != task.fixed_image_size:
        raise ValueError(
            f"backbone {task.backbone_name} takes {task.fixed_image_size}px images (learned position "
            f"embeddings) but the data is set to image_size={data.image_size}; use image_size="
            f"{task.fixed_image_size}"
        )


def finetune_from_config(config: RunConfig) -> tuple[Trainer, ImageClassifier, list[dict]]:
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
    arguments = {"freeze_unfreeze": strategy_config.unfreeze_epoch,
                 "unfreeze_milestones": (strategy_config.milestones, strategy_config.num_layers)}
    strategy = (strategy_config.name, arguments.get(strategy_config.name))
    trainer = Trainer(config.trainer)
    metrics = trainer.finetune(task, data, strategy=strategy, train_bn=strategy_config.train_bn)
    return trainer, task, metrics
