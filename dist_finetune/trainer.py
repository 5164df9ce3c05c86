"""The finetuning loop: ``Trainer(max_epochs=10).finetune(task, data, strategy="freeze_unfreeze")``.

``finetune`` runs phases, each a method, in dependency order: ``_check_inputs`` (strategy, data,
checkpoint; no accelerator yet) -> ``_start`` (accelerator, image scan, one :class:`RunState`, the
callbacks) -> ``_build`` (callbacks' ``setup``: the strategy freezes; the optimizer) ->
``Resume.into_model`` (on resume) -> ``_prepare`` (loaders, memory format, ``accelerator.prepare``, the
schedule) -> ``Resume.into_prepared`` (on resume) -> ``_fit`` -> ``_teardown``. Per epoch:
``on_epoch_start`` (strategy transitions) -> DDP resync and rank check if anything changed -> train
(``on_step_end`` after each step) -> validate -> ``on_validation_end`` -> ``on_epoch_end``.
Everything else a run does (checkpoint cadence, preemption, the metrics log, the best model, early
stopping, trackers) is a callback; see ``callbacks.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .activation_checkpointing import checkpoint_trainable_layers
from .callbacks import Callback, CallbackList, Position, RunState
from .config import RunConfig, TrainerConfig
from .data import ImageClassificationData
from .determinism import configure_determinism
from .distributed import (
    DDPResync,
    any_rank,
    average_gradients,
    broadcast_buffers,
    check_rank_consistency,
    launcher_compile_settings,
    local_world_size,
    make_accelerator,
    release_wrappers,
)
from .errors import ConfigError
from .feature_cache import epoch_loader
from .fsdp import prepare, resolve_sharding, shard_for_training
from .ema import WeightEMA
from .finetuning import BaseFinetuning, NoFreeze, StrategyCallback, build_optimizer, resolve_strategy, trainable_parameters
from .host_memory import keep_freed_memory
from .inference import eval_loader, validation_metrics
from .load_failures import LoadFailureReport
from .lora import check_lora, file_weights, merge_adapters
from .loss_guard import LossGuard, refuse_non_finite_weights
from .lr_finder import LRFinderResult, LRSweep, find_lr
from .memory_format import resolve_channels_last
from .mixing import batch_mixing, training_loss
from .metrics import MetricsLogger
from .model_selection import MODEL_FILENAME, BestModel, EarlyStopping
from .preemption import Preemption
from .reports import validation_report
from .resume import Resume
from .run_records import run_outputs
from .schedule import WarmupSchedule
from .task import ImageClassifier
from .trackers import check_trackers
from .run_signature import run_signature
from .training_state import CheckpointCadence, checkpoint_to_resume, write_training_state

__all__ = ["Trainer", "MODEL_FILENAME"]


class Trainer:
    """Finetunes an :class:`ImageClassifier`; settings are :class:`TrainerConfig` fields.

    ``callbacks``: extra :class:`~dist_finetune.callbacks.Callback` objects, called after the
    strategy and before the built-in logging, model selection, checkpointing and preemption ones.
    """

    def __init__(self, config: TrainerConfig | RunConfig | None = None, callbacks: list | None = None, **settings):
        self.run_config = config if isinstance(config, RunConfig) else None  # for config.yaml and trackers
        base = dataclasses.asdict(getattr(config, "trainer", config)) if config is not None else {}
        self.config = TrainerConfig(**{**base, **settings})
        self.callbacks = list(callbacks or [])
        self.accelerator = None
        self.task: ImageClassifier | None = None
        self.run: RunState | None = None  # the last finetune's state, for inspection; never reused

    # ----------------------------------------------------------------------------- public

    def finetune(self, task: ImageClassifier, data: ImageClassificationData, strategy="no_freeze",
                 train_bn: bool | None = None, resume: str | None = None) -> list[dict]:
        """Train ``task`` on ``data`` with a strategy; returns one metrics dict per epoch.

        ``train_bn``: for strategies given by name (None: the built-in default, frozen BatchNorm in
        eval mode). ``resume`` (None: the config's ``resume``): "latest" (newest intact checkpoint in
        output_dir; a fresh start if there is none) or a checkpoint folder. Raises ``TrainingPreempted``
        after saving on SIGUSR1/SIGTERM.
        """
        strategy, config, checkpoint = self._check_inputs(task, data, strategy, train_bn, resume)
        run = self._start(task, data, strategy, config)
        try:
            self._build(run)
            restore = Resume(checkpoint, run.accelerator.process_index) if checkpoint is not None else None
            if restore is not None:
                restore.into_model(run)  # before prepare: weights into the unwrapped model, the strategy replayed
            self._prepare(run)
            if restore is not None:
                restore.into_prepared(self, run)  # after prepare: optimizer state, schedule step, scaler, RNG
            self._fit(run)
        finally:
            self._teardown(run)
        return run.history

    def lr_find(self, task: ImageClassifier, data: ImageClassificationData, strategy="no_freeze",
                train_bn: bool | None = None, sweep: LRSweep | None = None) -> LRFinderResult:
        """fastai's ``lr_find`` (``lr_finder.py``): an exponential lr sweep of what ``strategy``'s first epoch
        trains, on a copy (``task`` is left as it was); the main process writes the curve to output_dir."""
        strategy, config, _ = self._check_inputs(task, data, strategy, train_bn, None)
        accelerator = self._make_accelerator()
        self._check_images(data, accelerator)
        return find_lr(task, strategy, config, accelerator, self._loaders(data, accelerator)[0],
                       data.loss_weights(), sweep or LRSweep())

    @property
    def metrics(self) -> list[dict]:
        """One dict per finished epoch of the last finetune (also in output_dir/metrics.jsonl)."""
        return self.run.history if self.run is not None else []

    def validate(self, task: ImageClassifier, data: ImageClassificationData) -> dict:
        """Validation loss and accuracy of ``task`` on ``data``'s val images (each counted once)."""
        accelerator = self.accelerator or self._make_accelerator()
        return validation_metrics(task, eval_loader(task, data, accelerator), accelerator, self.config.tta)

    def evaluate(self, task: ImageClassifier, data: ImageClassificationData, top_losses: int = 10) -> dict:
        """The report (``evaluation.build_report``) of ``task`` on ``data``'s val images (each once), on every rank."""
        accelerator = self.accelerator or self._make_accelerator()
        return validation_report(task, eval_loader(task, data, accelerator), accelerator, data, top_losses,
                                 self.config.tta)

    def predict(self, task: ImageClassifier, paths, batch_size: int = 32):
        """Labels for a path, a list of paths, or a folder (see :meth:`ImageClassifier.predict`), with ``tta``."""
        return task.predict(paths, batch_size=batch_size, tta=self.config.tta)

    def save_checkpoint(self, path: str | os.PathLike, training: dict | None = None) -> None:
        """Write the task's model file (weights + metadata, safetensors); every rank calls it (the finite
        check and gathering sharded weights are collective), the main process writes.

        ``training``: what to record about the epoch the weights come from (epoch, metrics).
        """
        if self.task is None:
            raise RuntimeError("save_checkpoint needs a model: call finetune first")
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        refuse_non_finite_weights(accelerator, self.task.state_dict(), path, self.run and self.run.last_checkpoint)
        weights = file_weights(self.task)  # on every rank: gathering sharded (FSDP2) ones is collective
        if accelerator.is_main_process:
            self.task.save_checkpoint(path, training=training, weights=weights)
        accelerator.wait_for_everyone()

    def save_training_state(self, run: RunState) -> Path | None:
        """Write a training-state checkpoint of ``run`` now (every rank must call this; once per position)."""
        if run.output_dir is None:
            return None
        self.check_training(run)  # never a checkpoint with NaN weights
        if run.saved_position == run.position:
            return run.last_checkpoint  # this exact state is saved already: never rewrite it in place
        refuse_non_finite_weights(run.accelerator, run.task.state_dict(), "a checkpoint", run.last_checkpoint)
        run.last_checkpoint = write_training_state(run)
        run.saved_position = dataclasses.replace(run.position)  # a copy: training moves the position on
        return run.last_checkpoint

    def check_training(self, run: RunState) -> None:
        """Total the epoch's training loss over ranks into ``run.position`` (one host sync per position);
        stop on a non-finite loss (when: see ``loss_guard.py``)."""
        if run.loss_guard is not None:
            run.loss_guard.check(run.position, run.last_checkpoint)

    def announce(self, message: str) -> None:
        """Print ``message`` once (main process), without breaking the progress bar."""
        if self.accelerator is not None and self.accelerator.is_main_process:
            tqdm.write(message)

    # ------------------------------------------------------------------------------ setup

    def _check_inputs(self, task: ImageClassifier, data: ImageClassificationData, strategy, train_bn: bool | None,
                      resume: str | None) -> tuple[BaseFinetuning, TrainerConfig, Path | None]:
        """What needs no accelerator, so a wrong setting fails before any process group starts: the strategy
        and its schedule, the data for the model, this run's settings (its ``resume`` too), the checkpoint."""
        strategy = resolve_strategy(strategy, train_bn=train_bn)
        strategy.validate(self.config.max_epochs)
        task.check_data(data)
        config = dataclasses.replace(self.config, resume=self.config.resume if resume is None else resume)
        checkpoint = checkpoint_to_resume(config.resume, config.output_dir)
        config.sharding = resolve_sharding(config.sharding, freezes=not isinstance(strategy, NoFreeze))
        check_lora(strategy, task, config.sharding)
        return strategy, config, checkpoint

    def _start(self, task: ImageClassifier, data: ImageClassificationData, strategy: BaseFinetuning,
               config: TrainerConfig) -> RunState:
        """The accelerator, the image scan, the data's metadata onto the model, and the run's state and callbacks."""
        accelerator = self._make_accelerator(log_with=check_trackers(config.report_to, config.output_dir))
        resolve_sharding(config.sharding, not isinstance(strategy, NoFreeze), accelerator)  # a plugin given in code
        set_seed(config.seed)
        self._check_images(data, accelerator)
        # class weights (None unless data.class_weights='auto') weight the training loss and go into the model file
        task.labels, task.image_size, task.class_weights = list(data.classes), data.image_size, data.loss_weights()
        run = RunState(config=config, accelerator=accelerator, task=task, data=data, strategy=strategy,
                       signature=run_signature(task, data, strategy, config))
        run.callbacks = CallbackList(self._run_callbacks(strategy))
        self.run, self.task = run, task
        return run

    def _build(self, run: RunState) -> None:
        """The callbacks' ``setup`` (the strategy freezes), activation checkpointing and FSDP2 sharding of the
        layers as frozen, then the optimizer over what trains now (the sharded parameters, under FSDP2)."""
        run.callbacks.call("setup", self, run)
        if run.config.activation_checkpointing:
            checkpoint_trainable_layers(run.task)
        run.sharded = run.config.sharding == "fsdp2" and shard_for_training(run.task, run.accelerator)
        run.optimizer = build_optimizer(run.task, run.config)
        self._announce_trainable(run)

    def _announce_trainable(self, run: RunState) -> None:
        """At the start and after every transition: "trainable parameters: N of M (x.xx%)"."""
        trainable, total = (sum(p.numel() for p in params) for params in (trainable_parameters(run.task),
                                                                          run.task.parameters()))
        self.announce(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    def _make_accelerator(self, log_with: list[str] | None = None):
        config = self.config
        configure_determinism(config.deterministic)  # before the accelerator starts CUDA
        self.accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, log_with,
                                            config.output_dir, config.process_group_timeout_s)
        if self.accelerator.device.type == "cuda" and not config.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        elif self.accelerator.device.type == "cpu" and config.tune_cpu_allocator:
            self.announce(f"CPU run: malloc {keep_freed_memory()}")
        return self.accelerator

    def _run_callbacks(self, strategy: BaseFinetuning) -> list[Callback]:
        config = self.config
        built_in: list[Callback] = [*([WeightEMA(config.ema_decay)] if config.ema_decay else []),
                                    BestModel(config.metric_for_best, config.load_best_model_at_end)]
        if config.early_stopping_patience is not None:
            built_in.append(EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta,
                                          config.metric_for_best))
        built_in += [MetricsLogger(config.log_every_n_steps), *run_outputs(config, self.run_config),
                     CheckpointCadence(config.save_every_n_steps), Preemption(config.check_every_n_steps),
                     LoadFailureReport()]
        return [StrategyCallback(strategy, config.layer_decay), *self.callbacks, *built_in]

    def _check_images(self, data: ImageClassificationData, accelerator) -> None:
        """Scan all images before any training, split over all ranks (none waits for another), one verdict for all."""
        skipped = data.check_images(accelerator)
        if skipped:
            self.announce(f"skipping {len(skipped)} unreadable image(s):")
            for path, problem in sorted(skipped.items()):
                self.announce(f"  {path}: {problem}")
        for line in data.summary:  # class counts, leakage and duplicates, imbalance
            self.announce(line)

    def _prepare(self, run: RunState) -> None:
        """Loaders, memory format, ``accelerator.prepare``, and the schedule."""
        config, accelerator, task = run.config, run.accelerator, run.task
        train_loader, val_loader = self._loaders(run.data, accelerator)
        wanted = resolve_channels_last(config.channels_last, task, accelerator.device, task.image_size,
                                       run.data.batch_size)
        run.channels_last = not any_rank(accelerator, not wanted)  # all ranks alike: DDP checks strides
        # both ways: weights left channels_last (by a GPU predict, an earlier run) must not take the CPU's unsafe path
        task.to(memory_format=torch.channels_last if run.channels_last else torch.contiguous_format)
        run.model, run.optimizer, run.train_loader, run.val_loader = prepare(
            accelerator, task, run.sharded, run.optimizer, train_loader, val_loader)
        run.steps_per_epoch = steps = math.ceil(len(run.train_loader) / config.gradient_accumulation_steps)
        run.schedule = WarmupSchedule(run.optimizer, steps * config.max_epochs, round(config.warmup_epochs * steps),
                                      config.scheduler, round(config.unfreeze_warmup_epochs * steps))
        run.compile_with = ((config.compile_backend, config.compile_mode) if config.compile
                            else launcher_compile_settings())
        run.loss_guard = LossGuard(accelerator, config.check_every_n_steps)

    def _loaders(self, data: ImageClassificationData, accelerator):
        processes, local = accelerator.num_processes, local_world_size(accelerator)
        global_batch = data.batch_size * processes
        if len(data.train_paths) < global_batch:
            raise ConfigError(
                f"{len(data.train_paths)} training images but one step needs batch_size {data.batch_size} x "
                f"{processes} process(es) = {global_batch}: lower batch_size or add images"
            )
        pin = accelerator.device.type == "cuda"
        train = data.dataloader(data.train_dataset(self.config.seed), shuffle=True, local_processes=local,
                                pin_memory=pin, drop_last=True, seed=self.config.seed)
        # val workers start afresh each epoch: kept alive, they would be forked after the first epoch
        # from a process whose heap then holds training's freed activations, and keep a private
        # copy of every page training rewrites (~1 GB each at 224 px on CPU)
        val = data.dataloader(data.val_dataset(), shuffle=False, local_processes=local, pin_memory=pin,
                              persistent_workers=False)
        return train, val

    def _training_forward(self, run: RunState):
        """``run.model``, or its torch.compile'd wrapper, compiled anew for each DDP wrapper.

        Compiled outside ``accelerator.prepare`` so the DDP rebuild after an unfreeze stays possible;
        the changed ``requires_grad`` (and a new wrapper) costs one recompilation per transition.
        """
        if run.compile_with is None:
            return run.model
        if run.compiled is None or run.compiled[0] is not run.model:
            backend, mode = run.compile_with
            run.compiled = (run.model, torch.compile(run.model, backend=backend, mode=mode))
        return run.compiled[1]

    # ----------------------------------------------------------------------------- epochs

    def _fit(self, run: RunState) -> None:
        """``on_fit_start``, the epochs, the final rank check, ``on_fit_end``."""
        run.callbacks.call("on_fit_start", self, run)
        self._run_epochs(run)
        if run.config.check_rank_consistency:
            check_rank_consistency(run.accelerator, run.model, run.optimizer, "at the end of training",
                                   run.ema_weights)
        merge_adapters(run.task)  # LoRA: the task leaves training a plain model, as its model file loads
        if run.stop_reason:
            self.announce(f"training stopped: {run.stop_reason}")
        run.callbacks.call("on_fit_end", self, run)

    def _teardown(self, run: RunState) -> None:
        """Always: the callbacks' ``teardown``; no DDP wrapper (it holds the process group) outlives the run
        (see ``distributed.shutdown``)."""
        run.callbacks.teardown(self, run)
        run.model, run.compiled = run.task, None
        release_wrappers(run.accelerator)

    def _run_epochs(self, run: RunState) -> None:
        """Epochs from ``run.position`` until ``max_epochs`` or a ``stop_reason``."""
        accelerator, callbacks, resync = run.accelerator, run.callbacks, DDPResync(run.accelerator, run.model)
        while run.position.epoch < run.config.max_epochs and run.stop_reason is None:
            epoch = run.position.epoch
            if run.position.batch == 0:
                groups_before = len(run.optimizer.param_groups)
                callbacks.call("on_epoch_start", self, run)
                if len(run.optimizer.param_groups) != groups_before or resync.changed():
                    if run.config.check_rank_consistency:  # before the rebuild, whose broadcast would hide drift
                        check_rank_consistency(accelerator, run.task, run.optimizer,
                                               f"after the strategy transition at epoch {epoch}", run.ema_weights)
                    run.model = resync()
                    self._announce_trainable(run)
            run.model.train()
            record = {"epoch": epoch, **self._train_epoch(run)}
            broadcast_buffers(accelerator, run.task)  # every rank validates (and saves) rank 0's BN statistics
            record.update(validation_metrics(run.task, run.val_loader, accelerator, run.config.tta))
            run.loss_guard.check_validation(record, run.position, run.last_checkpoint)
            record["lr"] = [group["lr"] for group in run.optimizer.param_groups]
            callbacks.call("on_validation_end", self, run, record)
            run.position = Position(epoch=epoch + 1, global_step=run.position.global_step)
            run.history.append(record)
            callbacks.call("on_epoch_end", self, run, record)

    def _train_epoch(self, run: RunState) -> dict:
        """One epoch from ``run.position`` (mid-epoch after a resume), calling ``on_step_end`` per step.

        On cached features (``head_only``) only the head runs, and its gradients are averaged over
        ranks here since it trains outside the DDP wrapper. The loss totals (``run.loss_guard``) stay
        on the device and reach the host only at checks, so a GPU step never waits.
        """
        accelerator, config, position, task = run.accelerator, run.config, run.position, run.task
        loader, head_only = epoch_loader(run, self.announce)
        run.epoch_batches = len(loader)
        loader.set_epoch(position.epoch)
        if position.batch:
            loader = accelerator.skip_first_batches(loader, position.batch)
            loader.set_epoch(position.epoch)
        params = trainable_parameters(run.model)
        forward = task.head if head_only else self._training_forward(run)
        channels_last = run.channels_last and not head_only
        class_weights = torch.tensor(task.class_weights, device=accelerator.device) if task.class_weights else None
        mixing = batch_mixing(config.mixup, config.cutmix, task.num_classes, config.seed, accelerator.process_index)
        run.loss_guard.start_epoch(position)
        seen_before = position.seen  # a resumed epoch's images/s counts only what this run trained
        global_batch = 0
        bar = tqdm(loader, desc=f"epoch {position.epoch}", leave=False, dynamic_ncols=True,
                   disable=True if not (config.progress_bar and accelerator.is_main_process) else None)
        start = time.perf_counter()
        for images, labels in bar:
            targets = labels  # class labels, or mixed images' soft targets
            if mixing is not None:
                images, targets = mixing(images, labels, position.epoch, position.batch)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(run.model):
                logits = forward(images)
                loss = training_loss(logits.float(), targets, class_weights, config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and head_only:
                    average_gradients(accelerator, task.head)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            run.loss_guard.add(loss, labels.numel(), accelerator.sync_gradients)
            global_batch = global_batch or labels.numel() * accelerator.num_processes
            position.batch += 1
            position.samples_done += global_batch
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                run.schedule.step()
            position.global_step += 1
            if position.global_step % config.check_every_n_steps == 0:
                self.check_training(run)
            run.callbacks.call("on_step_end", self, run)
        totals = run.loss_guard.end_epoch(position, run.last_checkpoint)  # no NaN reaches the epoch's checkpoint
        elapsed = time.perf_counter() - start
        return {"train_loss": totals.mean_loss, "train_images": totals.images,
                "images_per_s": (totals.images - seen_before) / elapsed, "epoch_time_s": elapsed,
                "nonfinite_losses": totals.non_finite}

