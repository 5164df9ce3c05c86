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
    launcher_compile_settings,
    make_accelerator,
    refuse_freezing_under_sharding,
)
from .feature_cache import FeatureDataset, all_reduce_gradients, backbone_is_static, cache_fits, encode_dataset
from .finetuning import BaseFinetuning, NoFreeze, resolve_strategy, trainable_parameters
from .metrics import MetricsLog
from .resume import (
    Position,
    StopSignals,
    TrainingPreempted,
    check_signature,
    checkpoint_to_resume,
    load_training_state,
    restore_training_state,
    save_training_state,
)
from .schedule import WarmupSchedule
from .task import ImageClassifier

MODEL_FILENAME = "model.safetensors"


class Trainer:
    """Finetunes an :class:`ImageClassifier`; settings are :class:`TrainerConfig` fields."""

    def __init__(self, config: TrainerConfig | None = None, **settings):
        base = dataclasses.asdict(config) if config is not None else {}
        self.config = TrainerConfig(**{**base, **settings})
        self.accelerator = None
        self.model = None  # the prepared (possibly DDP-wrapped) model of the last finetune
        self.task: ImageClassifier | None = None
        self._metrics = MetricsLog(None, is_main_process=False)
        self.signature: dict = {}
        self._last_saved: Path | None = None
        self._feature_loader = None
        self._compile_settings: tuple[str, str | None] | None = None
        self._compiled: tuple | None = None  # (model, its compiled wrapper)

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
        checkpoint = checkpoint_to_resume(resume, config.output_dir)
        accelerator = self._accelerator()
        refuse_freezing_under_sharding(accelerator, freezes=not isinstance(strategy, NoFreeze))
        self._compile_settings = ((config.compile_backend, config.compile_mode) if config.compile
                                  else launcher_compile_settings())
        self._compiled = None
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
        if self._use_channels_last(task):
            task.to(memory_format=torch.channels_last)
        model, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
        steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
        schedule = WarmupSchedule(optimizer, steps_per_epoch * config.max_epochs,
                                  round(config.warmup_epochs * steps_per_epoch), config.scheduler)
        if saved is not None:
            position = restore_training_state(accelerator, saved, optimizer, schedule, data.batch_size, checkpoint)
            self._last_saved = checkpoint
            if accelerator.is_main_process:
                tqdm.write(f"resumed from {checkpoint} at epoch {position.epoch}, batch {position.batch}, "
                           f"step {position.global_step}")
        resync = DDPResync(accelerator, model)
        self.task, self.model, self.signature = task, model, signature
        self._metrics = MetricsLog(config.output_dir, accelerator.is_main_process,
                                   keep_epochs_before=position.epoch if saved is not None else 0)

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
                self._metrics.log({"epoch": epoch, **train_stats, **val_stats,
                                   "lr": [group["lr"] for group in optimizer.param_groups]})
                position = Position(epoch=epoch + 1, global_step=position.global_step)
                self._save_state(optimizer, schedule, position)

        if config.check_rank_consistency:
            check_rank_consistency(accelerator, model, optimizer, "at the end of training")
        if config.output_dir:
            self.save_checkpoint(Path(config.output_dir) / MODEL_FILENAME)
        return self.metrics

    @property
    def metrics(self) -> list[dict]:
        """One dict per finished epoch of the last finetune (also in output_dir/metrics.jsonl)."""
        return self._metrics.records

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
        # val workers start afresh each epoch: kept alive, they would be forked after the first epoch
        # from a process whose heap then holds training's freed activations, and keep a private
        # copy of every page training rewrites (~1 GB each at 224 px on CPU)
        val = data.dataloader(data.val_dataset(), shuffle=False, local_processes=local, pin_memory=pin,
                              persistent_workers=False)
        return train, val

    def _training_forward(self, model):
        """``model``, or its torch.compile'd wrapper, compiled anew for each DDP wrapper.

        Compiled outside ``accelerator.prepare`` so the DDP rebuild after an unfreeze stays possible;
        the changed ``requires_grad`` (and a new wrapper) costs one recompilation per transition.
        """
        if self._compile_settings is None:
            return model
        if self._compiled is None or self._compiled[0] is not model:
            backend, mode = self._compile_settings
            self._compiled = (model, torch.compile(model, backend=backend, mode=mode))
        return self._compiled[1]

    def _use_channels_last(self, task: ImageClassifier) -> bool:
        """channels_last for conv nets unless configured: faster on GPUs (tensor cores) and on CPUs (oneDNN)."""
        if self.config.channels_last is not None:
            return self.config.channels_last
        return task.is_convnet

    # ------------------------------------------------------------------------------ state

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
        gradients are averaged over ranks here since it trains outside the DDP wrapper. The loss
        totals stay on the device and reach the host only at checks, so a GPU step never waits.
        """
        accelerator, config = self.accelerator, self.config
        loader.set_epoch(epoch)
        if position.batch:
            loader = accelerator.skip_first_batches(loader, position.batch)
            loader.set_epoch(epoch)
        params = trainable_parameters(model)
        forward = self.task.head if head_only else self._training_forward(model)
        channels_last = self._use_channels_last(self.task) and not head_only
        # [loss sum, images, non-finite losses]; totals carried over a resume count once, on rank 0
        carried = [position.loss_sum, position.seen] if accelerator.is_main_process else [0.0, 0.0]
        running = torch.tensor([*carried, 0.0], device=accelerator.device, dtype=torch.float64)
        seen_before = position.seen  # a resumed epoch's images/s counts only what this run trained
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
            value = loss.detach().double()
            finite = torch.isfinite(value)
            running[0] += torch.where(finite, value * labels.numel(), 0.0)  # fp16 overflows are skipped steps
            running[1] += labels.numel()
            running[2] += (~finite).double()
            global_batch = global_batch or labels.numel() * accelerator.num_processes
            position.batch += 1
            position.samples_done += global_batch
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                schedule.step()
            position.global_step += 1
            self._after_step(optimizer, schedule, position, running, stop)
        self._check(optimizer, schedule, position, running, stop)  # no NaN ever reaches the epoch's checkpoint
        elapsed = time.perf_counter() - start
        return {"train_loss": position.loss_sum / max(1, position.seen), "train_images": position.seen,
                "images_per_s": (position.seen - seen_before) / elapsed, "epoch_time_s": elapsed}

    def _after_step(self, optimizer, schedule, position: Position, running: torch.Tensor, stop: StopSignals) -> None:
        """Check every ``check_every_n_steps`` steps and before each cadence save; save on the cadence."""
        config = self.config
        saving = bool(config.save_every_n_steps) and position.global_step % config.save_every_n_steps == 0
        if saving or position.global_step % config.check_every_n_steps == 0:
            self._check(optimizer, schedule, position, running, stop)
        if saving:
            self._save_state(optimizer, schedule, position)

    def _check(self, optimizer, schedule, position: Position, running: torch.Tensor, stop: StopSignals) -> None:
        """Read the totals (one host sync, summed over ranks so all agree); stop on a NaN loss or a signal."""
        accelerator = self.accelerator
        stop_flag = torch.tensor([float(stop.received or 0)], device=running.device, dtype=running.dtype)
        totals = torch.cat([running, stop_flag])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        loss_sum, seen, non_finite, signalled = totals.tolist()
        position.loss_sum, position.seen = loss_sum, int(seen)
        if non_finite and accelerator.mixed_precision != "fp16":  # fp16 overflows are the GradScaler's to skip
            last = self._last_saved or "none (no checkpoint written yet)"
            raise FloatingPointError(
                f"non-finite training loss in epoch {position.epoch} by step {position.global_step} (checked every "
                f"{self.config.check_every_n_steps} steps); last good checkpoint: {last}. Lower the lr or set "
                "max_grad_norm.")
        if signalled:
            if not self.config.output_dir:
                raise TrainingPreempted(Path("(nowhere: no output_dir)"), "a stop signal")
            saved = self._save_state(optimizer, schedule, position)
            raise TrainingPreempted(saved, signal.Signals(stop.received).name if stop.received else "a peer rank")

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
