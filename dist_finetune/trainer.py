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
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .config import TrainerConfig
from .data import ImageClassificationData
from .distributed import (
    DDPResync,
    broadcast_buffers,
    check_rank_consistency,
    make_accelerator,
    refuse_freezing_under_sharding,
)
from .checkpoint import CheckpointError
from .feature_cache import FeatureDataset, all_reduce_gradients, backbone_is_static, cache_fits, encode_dataset
from .finetuning import BaseFinetuning, NoFreeze, resolve_strategy, trainable_parameters
from .resume import (
    Position,
    StopSignals,
    TrainingPreempted,
    check_signature,
    find_checkpoint,
    has_checkpoints,
    load_training_state,
    restore_rng,
    save_training_state,
)
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
        self.signature: dict = {}
        self._last_saved: Path | None = None
        self._feature_loader = None

    # ----------------------------------------------------------------------------- public

    def finetune(self, task: ImageClassifier, data: ImageClassificationData, strategy="no_freeze",
                 train_bn: bool = True, resume: str | None = None) -> list[dict]:
        """Train ``task`` on ``data`` with a strategy; returns one metrics dict per epoch.

        ``resume``: "latest" (newest intact checkpoint in output_dir; a fresh start if there is none)
        or a checkpoint folder. Raises :class:`TrainingPreempted` after saving on SIGUSR1/SIGTERM.
        """
        config = self.config
        strategy = resolve_strategy(strategy, train_bn=train_bn)
        strategy.validate(config.max_epochs)
        _check_image_size(task, data)
        checkpoint = self._checkpoint_to_resume(resume)
        accelerator = self._accelerator()
        refuse_freezing_under_sharding(accelerator, freezes=not isinstance(strategy, NoFreeze))
        set_seed(config.seed)

        self._check_images(data, accelerator)
        task.labels, task.image_size = list(data.classes), data.image_size
        signature = _run_signature(task, data, strategy)
        strategy.freeze_before_training(task)
        optimizer = self._build_optimizer(task)
        saved, position = None, Position()
        if checkpoint is not None:
            saved = load_training_state(checkpoint, accelerator.process_index)
            check_signature(saved["signature"], signature, checkpoint)
            position = saved["position"]
            for epoch in range(position.epoch + (1 if position.batch else 0)):  # rebuild the group layout
                strategy.call_finetune_function(task, epoch, optimizer)
            task.load_weights(saved["model"], str(checkpoint))
        train_loader, val_loader = self._loaders(data, accelerator)
        if self._use_channels_last(task, accelerator):
            task.to(memory_format=torch.channels_last)
        model, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
        steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
        schedule = WarmupSchedule(optimizer, steps_per_epoch * config.max_epochs,
                                  round(config.warmup_epochs * steps_per_epoch), config.scheduler)
        if saved is not None:
            position = self._restore(saved, optimizer, schedule, position, data.batch_size, checkpoint)
        resync = DDPResync(accelerator, model)
        self.task, self.model, self.signature = task, model, signature
        self._start_metrics_file(keep_epochs_before=position.epoch if saved is not None else 0)

        with StopSignals() as stop:
            for epoch in range(position.epoch, config.max_epochs):
                if position.batch == 0:
                    model = self._apply_strategy(strategy, task, epoch, optimizer, resync)
                self.model = model
                model.train()
                loader, head_only = self._epoch_loader(task, data, train_loader)
                train_stats = self._train_epoch(model, optimizer, schedule, loader, epoch, position, stop, head_only)
                broadcast_buffers(task)  # every rank validates (and later saves) rank 0's BN statistics
                val_stats = self._evaluate(task, val_loader)
                self._log({"epoch": epoch, **train_stats, **val_stats,
                           "lr": [group["lr"] for group in optimizer.param_groups]})
                position = Position(epoch=epoch + 1, global_step=position.global_step)
                self._save_state(optimizer, schedule, position)

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
        self.accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps)
        if self.accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        return self.accelerator

    @staticmethod
    def _check_images(data: ImageClassificationData, accelerator) -> None:
        """Scan all images before any training (the main process fills the cache, the others read it)."""
        with accelerator.main_process_first():
            skipped = data.check_images()
        if skipped and accelerator.is_main_process:
            tqdm.write(f"skipping {len(skipped)} unreadable image(s):")
            for path, problem in sorted(skipped.items()):
                tqdm.write(f"  {path}: {problem}")

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
        train = data.dataloader(data.train_dataset(self.config.seed), shuffle=True, local_processes=local, pin_memory=pin,
                                drop_last=True, seed=self.config.seed)
        val = data.dataloader(data.val_dataset(), shuffle=False, local_processes=local, pin_memory=pin)
        return train, val

    def _use_channels_last(self, task: ImageClassifier, accelerator) -> bool:
        if self.config.channels_last is not None:
            return self.config.channels_last
        return task.is_convnet and accelerator.device.type == "cuda"

    # ------------------------------------------------------------------------------ resume

    def _checkpoint_to_resume(self, resume: str | None) -> Path | None:
        output_dir = self.config.output_dir
        if resume is None:
            if has_checkpoints(output_dir):
                raise CheckpointError(
                    f"output dir {output_dir} already holds checkpoints of a run: continue it with "
                    "resume='latest' (--resume latest) or choose another output_dir"
                )
            return None
        return find_checkpoint(resume, output_dir)

    def _restore(self, saved: dict, optimizer, schedule: WarmupSchedule, position: Position, batch_size: int,
                 checkpoint: Path) -> Position:
        """Load optimizer, schedule, scaler and RNG; map the epoch position onto this process count."""
        accelerator = self.accelerator
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if accelerator.scaler is not None and saved["scaler"]:
            accelerator.scaler.load_state_dict(saved["scaler"])
        if saved["num_processes"] != accelerator.num_processes:
            global_batch = batch_size * accelerator.num_processes
            if position.samples_done % global_batch:
                raise CheckpointError(
                    f"{checkpoint} stopped {position.samples_done} samples into epoch {position.epoch}, not a multiple "
                    f"of this run's global batch {global_batch}: resume with {saved['num_processes']} processes"
                )
            position.batch = position.samples_done // global_batch
            warnings.warn(f"resuming a {saved['num_processes']}-process checkpoint with {accelerator.num_processes} "
                          "processes: training continues correctly but not bit-identically")
        elif saved["rng"] is not None:
            restore_rng(*saved["rng"])
        self._last_saved = checkpoint
        if accelerator.is_main_process:
            tqdm.write(f"resumed from {checkpoint} at epoch {position.epoch}, batch {position.batch}, "
                       f"step {position.global_step}")
        return position

    def _save_state(self, optimizer, schedule: WarmupSchedule, position: Position) -> Path | None:
        if not self.config.output_dir:
            return None
        self._last_saved = save_training_state(self.accelerator, Path(self.config.output_dir), self.task.state_dict(),
                                               optimizer, schedule, position, self.signature, self.config.keep_last)
        return self._last_saved

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

    def _epoch_loader(self, task: ImageClassifier, data: ImageClassificationData, train_loader):
        """The images, or (backbone frozen and deterministic) cached backbone features: (loader, head_only)."""
        accelerator = self.accelerator
        usable = (self.config.cache_frozen_features and not data.augment and backbone_is_static(task.backbone)
                  and cache_fits(len(data.train_paths), task.num_features))
        if not usable:
            self._feature_loader = None  # unfrozen (or never cacheable): free the cache
            return train_loader, False
        if self._feature_loader is None:
            with accelerator.autocast():
                features = encode_dataset(task, data.train_dataset(self.config.seed), data.batch_size,
                                          train_loader.num_workers, accelerator.device,
                                          accelerator.process_index, accelerator.num_processes)
            dataset = FeatureDataset(features, data.train_labels)
            loader = data.dataloader(dataset, shuffle=True, drop_last=True, seed=self.config.seed, num_workers=0)
            self._feature_loader = accelerator.prepare_data_loader(loader)
            if accelerator.is_main_process:
                tqdm.write(f"cached frozen backbone features of {len(dataset)} images; training the head on them")
        return self._feature_loader, True

    def _train_epoch(self, model, optimizer, schedule: WarmupSchedule, loader, epoch: int, position: Position,
                     stop: StopSignals, head_only: bool = False) -> dict:
        """One epoch from ``position`` (mid-epoch after a resume); saves on cadence and on stop signals.

        ``head_only``: the loader yields cached backbone features; only the head runs, and its
        gradients are averaged over ranks here since it trains outside the DDP wrapper.
        """
        accelerator, config = self.accelerator, self.config
        loader.set_epoch(epoch)
        if position.batch:
            loader = accelerator.skip_first_batches(loader, position.batch)
            loader.set_epoch(epoch)
        params = trainable_parameters(model)
        forward = self.task.head if head_only else model
        channels_last = self._use_channels_last(self.task, accelerator) and not head_only
        loss_sum = torch.tensor(position.loss_sum, device=accelerator.device, dtype=torch.float64)
        seen = torch.tensor(position.seen, device=accelerator.device, dtype=torch.float64)
        seen_before = seen.clone()  # a resumed epoch's images/s counts only what this run trained
        global_batch = 0
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=True if not (config.progress_bar and accelerator.is_main_process) else None)
        start = time.perf_counter()
        for images, labels in bar:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = forward(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and head_only:
                    all_reduce_gradients(self.task.head, accelerator.num_processes)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * labels.numel()
            seen += labels.numel()
            global_batch = global_batch or labels.numel() * accelerator.num_processes
            position.batch += 1
            position.samples_done += global_batch
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                schedule.step()
            position.global_step += 1
            position.loss_sum, position.seen = loss_sum.item(), int(seen.item())
            self._after_step(optimizer, schedule, position, loss, stop)
        totals = accelerator.reduce(torch.stack([loss_sum, seen, seen - seen_before]), reduction="sum")
        elapsed = time.perf_counter() - start
        return {"train_loss": (totals[0] / totals[1]).item(), "train_images": int(totals[1].item()),
                "images_per_s": totals[2].item() / elapsed, "epoch_time_s": elapsed}

    def _after_step(self, optimizer, schedule, position: Position, loss: torch.Tensor, stop: StopSignals) -> None:
        """Stop on a non-finite loss or a stop signal (agreed by all ranks), save on the cadence."""
        accelerator, config = self.accelerator, self.config
        flags = torch.tensor([float(stop.received or 0), float(not torch.isfinite(loss).all())],
                             device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        signalled, non_finite = flags.tolist()
        if non_finite and accelerator.mixed_precision != "fp16":  # fp16 overflows are the GradScaler's to skip
            last = self._last_saved or "none (no checkpoint written yet)"
            raise FloatingPointError(f"non-finite training loss at epoch {position.epoch} step {position.global_step}"
                                     f"; last good checkpoint: {last}. Lower the lr or set max_grad_norm.")
        if signalled:
            if not config.output_dir:
                raise TrainingPreempted(Path("(nowhere: no output_dir)"), "a stop signal")
            saved = self._save_state(optimizer, schedule, position)
            raise TrainingPreempted(saved, signal.Signals(stop.received).name if stop.received else "a peer rank")
        if config.save_every_n_steps and position.global_step % config.save_every_n_steps == 0:
            self._save_state(optimizer, schedule, position)

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

    def _start_metrics_file(self, keep_epochs_before: int) -> None:
        """Start metrics.jsonl afresh, keeping (on resume) the lines of epochs finished before it."""
        self.metrics = []
        if self.config.output_dir:
            path = Path(self.config.output_dir) / METRICS_FILENAME
            lines = path.read_text().splitlines() if keep_epochs_before and path.is_file() else []
            self.metrics = [r for r in map(json.loads, lines) if r["epoch"] < keep_epochs_before]
            if self.accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in self.metrics))

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


def _run_signature(task: ImageClassifier, data: ImageClassificationData, strategy: BaseFinetuning) -> dict:
    """What must not change between a checkpoint and the run that resumes it."""
    return json.loads(json.dumps({
        "backbone": task.backbone_name, "classes": list(data.classes), "image_size": data.image_size,
        "head": [task.head_hidden, task.head_dropout], "strategy": strategy.describe(),
    }))


def _check_image_size(task: ImageClassifier, data: ImageClassificationData) -> None:
    if task.fixed_image_size is not None and data.image_size != task.fixed_image_size:
        raise ValueError(
            f"backbone {task.backbone_name} takes {task.fixed_image_size}px images (learned position "
            f"embeddings) but the data is set to image_size={data.image_size}; use image_size="
            f"{task.fixed_image_size}"
        )
