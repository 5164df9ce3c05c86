"""What a run records about itself, and the plan a dry run prints.

- ``config.yaml``: the resolved :class:`RunConfig` (defaults < ``--config`` file < flags), which
  ``dist-finetune train --config OUTPUT_DIR/config.yaml`` runs again;
- ``run_info.json``: the environment (package versions, world size, device, mixed precision,
  host, time, command line; nothing from git);
- :func:`dry_run`: ``finetune`` up to the first epoch (so every check ``train`` makes, with the
  same errors), then the plan (data, model, strategy schedule, batch and steps, lr schedule, output
  files) as text, without training or writing anything;
- :func:`run_outputs`: the built-in callbacks behind these files, the trackers and the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from .callbacks import Callback, RunState
from .run_files import write_atomic
from .finetuning import Freeze, NoFreeze, StrategyCallback, layer_index, trainable_parameters
from .reports import Reports
from .schedule import WarmupSchedule
from .trackers import Trackers, tracker_names

CONFIG_FILENAME = "config.yaml"
RUN_INFO_FILENAME = "run_info.json"
PACKAGES = ("dist_finetune", "torch", "torchvision", "accelerate", "datasets", "timm", "safetensors", "numpy")


def config_yaml(config) -> str:
    """A RunConfig as YAML that ``config.load_yaml`` reads back to an equal RunConfig."""
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)


def run_info(accelerator, resumed_from=None) -> dict:
    """The environment of this run: versions (None: not installed), processes, device, precision."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = accelerator.device
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv, "host": socket.gethostname(), "python": platform.python_version(),
        "platform": platform.platform(), "versions": versions,
        "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resumed_from) if resumed_from else None,
    }


class RunRecords(Callback):
    """Writes ``config.yaml`` (when the run has a RunConfig) and ``run_info.json`` when training starts.

    A resumed run writes both again: ``run_info.json`` then describes the latest start, and
    ``config.yaml``'s ``trainer.resume`` names the checkpoint it resumed from.
    """

    def __init__(self, run_config=None):
        self.run_config = run_config

    def on_fit_start(self, trainer, run: RunState) -> None:
        if run.output_dir is None or not run.is_main_process:
            return
        run.output_dir.mkdir(parents=True, exist_ok=True)
        if self.run_config is not None:
            resume = str(run.resumed_from) if run.resumed_from else run.config.resume
            recorded = dataclasses.replace(self.run_config, trainer=dataclasses.replace(self.run_config.trainer,
                                                                                          resume=resume))
            write_atomic(run.output_dir / CONFIG_FILENAME, config_yaml(recorded).encode())
        info = json.dumps(run_info(run.accelerator, run.resumed_from), indent=2) + "\n"
        write_atomic(run.output_dir / RUN_INFO_FILENAME, info.encode())


def run_outputs(config, run_config=None) -> list[Callback]:
    """The built-in callbacks that write what a run shows: trackers (they log before a checkpoint is
    written, so a resume never loses a step), config.yaml / run_info.json, the final report."""
    outputs: list[Callback] = []
    if tracker_names(config.report_to):
        outputs.append(Trackers(run_config or config, config.log_every_n_steps))
    if config.output_dir:
        outputs += [RunRecords(run_config), Reports()]
    return outputs


class Planned(Exception):
    """Ends a dry run's ``finetune`` once everything is built, before anything is written."""


class _StopBeforeTraining(Callback):
    """Called before the built-in callbacks, whose ``on_fit_start`` write the run's first files."""

    def on_fit_start(self, trainer, run: RunState) -> None:
        self.run = run
        raise Planned


def dry_run(trainer, task, data, strategy="no_freeze", train_bn: bool | None = None,
            resume: str | None = None) -> str:
    """``trainer.finetune`` up to the point where training would start (every check made, the model,
    optimizer, loaders and schedule built, a checkpoint restored), then the plan as text; writes nothing."""
    stop = _StopBeforeTraining()
    trainer.callbacks.append(stop)
    try:
        trainer.finetune(task, data, strategy, train_bn, resume)
    except Planned:
        pass
    finally:
        trainer.callbacks.remove(stop)
    run, config = stop.run, trainer.config
    processes, steps = run.accelerator.num_processes, run.steps_per_epoch
    lines = ["dry run: everything checked; nothing trained or written", "data"]
    for split, source, labels in zip(("train", "val"), _sources(data.source), (data.train_labels, data.val_labels)):
        counts = ", ".join(f"{name} {labels.count(index)}" for index, name in enumerate(data.classes))
        lines.append(f"  {split}: {len(labels)} images from {source}: {counts}")
    augmentation = "off" if not data.augment else "on" if data.augment_policy == "basic" else data.augment_policy
    extras = [f"{name} {value:g}" for name, value in (("mixup", config.mixup), ("cutmix", config.cutmix)) if value]
    extras += [f"validation tta {config.tta}"] if config.tta != "none" else []
    lines.append(f"  {data.num_classes} classes, {data.image_size}px, augmentation {augmentation}"
                 + "".join(f", {extra}" for extra in extras))
    total, layers = sum(p.numel() for p in task.parameters()), layer_index(task)[1]
    lines += ["model", f"  {task.backbone_name} + head: {total:,} parameters; {len(layers)} backbone layers: "
                       f"{_shorten(layers)}"]
    lines += _strategy_schedule(trainer, run)
    effective = data.batch_size * processes * config.gradient_accumulation_steps
    lines += [
        "training",
        f"  {processes} process(es) on {run.accelerator.device}, mixed precision {run.accelerator.mixed_precision}",
        f"  effective batch {effective} = batch {data.batch_size} x {processes} process(es) x "
        f"{config.gradient_accumulation_steps} accumulation step(s)",
        f"  {steps} steps per epoch x {config.max_epochs} epochs = {steps * config.max_epochs} optimizer steps",
        f"  {config.optimizer} lr {config.lr:g}, weight decay {config.weight_decay:g}; {_lr_summary(config, run.schedule)}",
        f"  resumes from {run.resumed_from} at epoch {run.position.epoch}, step {run.position.global_step}"
        if run.resumed_from else "  starts fresh",
    ]
    return "\n".join(lines + _outputs(config))


def _strategy_schedule(trainer, run: RunState) -> list[str]:
    """The strategy's own hooks, run epoch by epoch on the model from the start (no training): who
    trains when, and the lr each group that joins gets, as training would print them."""
    task, strategy, config, events = run.task, run.strategy, trainer.config, []
    stand_in = SimpleNamespace(announce=events.append)  # the trainer, as far as the strategy's hooks need it
    replay = RunState(config=config, accelerator=run.accelerator, task=task, data=run.data, strategy=strategy)
    callback = StrategyCallback(strategy, config.layer_decay)
    callback.setup(stand_in, replay)
    trainable = sum(p.numel() for p in trainable_parameters(task))
    replay.optimizer = torch.optim.SGD(trainable_parameters(task), lr=config.lr)
    schedule = run.schedule
    replay.schedule = WarmupSchedule(replay.optimizer, schedule.total_steps, schedule.warmup_steps, schedule.kind,
                                     schedule.new_group_warmup_steps)
    for epoch in range(config.max_epochs):
        replay.position.epoch = epoch
        callback.on_epoch_start(stand_in, replay)
        replay.schedule.step_count += run.steps_per_epoch
        replay.schedule.refresh()
    frozen = [name for name, layer in zip(layer_index(task)[1], task.backbone_layers())
              if not any(p.requires_grad for p in layer.parameters())]
    settings = {key: value for key, value in strategy.describe().items() if key != "name"}
    lines = [f"strategy {type(strategy).__name__} ({', '.join(f'{k}={v}' for k, v in settings.items())})",
             f"  from epoch 0: {trainable:,} of {sum(p.numel() for p in task.parameters()):,} parameters train"]
    lines += [f"  {event}" for event in events]
    if frozen and not isinstance(strategy, Freeze):
        lines.append(f"  warning: {len(frozen)} backbone layer(s) never unfreeze in {config.max_epochs} "
                     f"epochs: {_shorten(frozen)}")
    elif not events and not isinstance(strategy, (Freeze, NoFreeze)):
        lines.append("  warning: the strategy adds nothing to train in this run")
    return lines


def _sources(source: dict) -> tuple[str, str]:
    """Where train and val come from, in words, from a data source's description."""
    dataset, parts = source.get("dataset"), source.get("datasets") or []
    train = (source.get("train_folder") or source.get("train_csv") or (dataset and f"{dataset}:{source['train_split']}")
             or (parts and parts[0]) or "the given data")
    val = (source.get("valid_folder") or source.get("val_csv")
           or (dataset and source.get("val_split_name") and f"{dataset}:{source['val_split_name']}")
           or (parts[1:] and parts[1]) or f"a stratified {source.get('val_split')} of train")
    return train, val


def _shorten(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _lr_summary(config, schedule: WarmupSchedule) -> str:
    warmup, ramp = schedule.warmup_steps, schedule.new_group_warmup_steps
    text = f"{schedule.kind} schedule" + (f" after {warmup} warmup steps" if warmup else "")
    text += "" if schedule.kind == "constant" else " to 0 at the last step"
    if ramp:
        text += f"; groups that join ramp up over {ramp} steps"
    if config.layer_decay not in (None, 1.0):
        text += f"; layer decay {config.layer_decay:g}"
    return text


def _outputs(config) -> list[str]:
    if not config.output_dir:
        return ["outputs: none (no output_dir)"]
    out = Path(config.output_dir)
    lines = [f"outputs in {out}/",
             "  model.safetensors (best epoch), last.safetensors, metrics.jsonl, steps.jsonl, checkpoints/step-N/,",
             f"  {CONFIG_FILENAME}, {RUN_INFO_FILENAME}, report.json, confusion_matrix.csv/.png, curves.png"]
    trackers = tracker_names(config.report_to)
    if trackers:
        lines.append(f"  trackers: {', '.join(trackers)} (TensorBoard: tensorboard --logdir {out})")
    return lines
