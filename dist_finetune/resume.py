"""What a resume does when this run's settings differ from its checkpoint's; each change is announced.

- The lr schedule is this run's: its horizon (steps per epoch x ``max_epochs``), warmup and kind
  come from this run's settings, and its step continues from the checkpoint, so a larger
  ``max_epochs`` extends the decay instead of training the added epochs at lr 0.
- Another batch size, process count or gradient accumulation changes what a step is: the position
  in the epoch is mapped by the samples done (refused when they do not fill whole optimizer steps
  of this run), and so are the schedule's step and every group's ``joined_step``.
- A changed lr, weight decay or SGD momentum is applied from the resume point: every param group's
  value is scaled by new / old, so the groups keep their ratios (layer decay, ``initial_denom_lr``).
- What changes the data or the sample order (the image lists, the seed, the sampler) is refused
  before anything is loaded, by the run signature (``run_signature.check_signature``).
- Checkpoints as new as or newer than the one resumed from belong to an abandoned continuation:
  ``training_state.CheckpointCadence`` moves them aside when training starts.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable

from .callbacks import RunState
from .errors import CheckpointError
from .fsdp import load_sharded_tensors
from .run_signature import check_signature
from .sharding import shard_optimizer_state
from .training_state import (
    TrainingState,
    join_optimizer_state,
    layout_of,
    load_training_state,
    optimizer_settings,
    restore_rng,
)

SCHEDULE_SETTINGS = {"total_steps": "schedule horizon", "warmup_steps": "warmup", "kind": "schedule",
                     "new_group_warmup_steps": "new groups' ramp"}


class Resume:
    """One checkpoint going into a run, in the two steps ``Trainer.finetune`` calls in this order:

    1. :meth:`into_model`, after the callbacks' ``setup`` and the optimizer, before ``accelerator.prepare``:
       the strategy's replay adds its param groups to that optimizer, and the weights go into the
       unwrapped model (the DDP wrapper then broadcasts them; FSDP2 shards them);
    2. :meth:`into_prepared`, after ``accelerator.prepare`` and the schedule: the optimizer state goes
       into the prepared (possibly sharded) optimizer, replacing the group settings the schedule gave the
       replayed groups; the RNG states come last, so nothing draws from them before the first batch.
    """

    def __init__(self, checkpoint: Path, rank: int):
        self.checkpoint = checkpoint
        self.saved = load_training_state(checkpoint, rank)

    def into_model(self, run: RunState) -> None:
        """Refuse another run's checkpoint, then restore the position, the callbacks' states (the strategy
        replays its epochs: the optimizer gets the groups the saved state has) and the weights."""
        if run.optimizer is None:
            raise RuntimeError("Resume.into_model needs the optimizer: the strategy's replay adds groups to it")
        saved = self.saved
        check_signature(saved.signature, run.signature, self.checkpoint)
        run.position = saved.position
        run.callbacks.load_state_dict(saved.callbacks, saved.callback_tensors)
        run.task.load_weights(saved.model, str(self.checkpoint))

    def into_prepared(self, trainer, run: RunState) -> None:
        """Restore the optimizer, schedule, scaler and RNG into the prepared ``run``; announce what differs."""
        if run.schedule is None:
            raise RuntimeError("Resume.into_prepared runs after the schedule is built (Trainer._prepare)")
        saved, checkpoint = self.saved, self.checkpoint
        position = saved.position
        step_of = _map_position(saved, run, checkpoint)
        # WarmupSchedule() gave every group, the replayed ones too, joined_step None (there from the start):
        # the saved groups' settings (initial_lr, and joined_step: the step each group joined) replace them here
        run.optimizer.load_state_dict(_optimizer_state(saved, run.optimizer))
        changes = apply_optimizer_settings(run.optimizer, _saved_optimizer_settings(saved),
                                           optimizer_settings(run.config))
        run.schedule.load_state_dict(saved.schedule, step_of)  # after the groups' joined_step is the saved one
        changes += _schedule_changes(saved.schedule, run.schedule.state_dict())
        accelerator = run.accelerator
        if accelerator.scaler is not None and saved.scaler:
            accelerator.scaler.load_state_dict(saved.scaler)
        if saved.rng is not None and saved.num_processes == accelerator.num_processes:
            restore_rng(*saved.rng, accelerator.device)
        run.position, run.resumed_from, run.last_checkpoint = position, checkpoint, checkpoint
        run.saved_position = dataclasses.replace(position)
        trainer.announce(f"resumed from {checkpoint} at epoch {position.epoch}, batch {position.batch}, "
                         f"step {position.global_step}")
        for change in changes:
            trainer.announce(change)
        if position.epoch >= run.config.max_epochs:
            warnings.warn(f"{checkpoint} is at the end of epoch {position.epoch - 1}: with max_epochs "
                          f"{run.config.max_epochs} nothing is left to train (raise max_epochs to train on)")


def _optimizer_state(saved: TrainingState, optimizer) -> dict:
    """The checkpoint's optimizer state as ``optimizer`` holds it: whole tensors cut to this rank's slices, or
    a sharded checkpoint's slices read straight into them (resharded for another process count)."""
    state = saved.optimizer
    if saved.sharded_optimizer is None:
        return shard_optimizer_state(state, optimizer)
    params = {index: param for group, held in zip(state["param_groups"], optimizer.param_groups)
              for index, param in zip(group["params"], held["params"])}
    tensors = load_sharded_tensors(saved.sharded_optimizer, lambda name: params.get(int(name.split(".", 1)[0])))
    scalars = {f"{index}.{key}": value for index, values in state["state"].items() for key, value in values.items()}
    return join_optimizer_state(tensors, {"param_groups": state["param_groups"], "scalars": scalars})


def _describe(layout: dict) -> str:
    return (f"batch_size {layout['batch_size']} x {layout['num_processes']} process(es) x "
            f"{layout['gradient_accumulation_steps']} accumulation step(s)")


def _samples_per_step(layout: dict) -> int:
    return layout["batch_size"] * layout["num_processes"] * layout["gradient_accumulation_steps"]


def _map_position(saved: TrainingState, run: RunState, checkpoint: Path) -> Callable[[int], int] | None:
    """Map the saved position onto this run's batch layout (in place); returns the map of the
    checkpoint's schedule steps onto this run's, or None when the layout is the same."""
    new = layout_of(run)
    old = saved.layout
    if old is None:  # written before checkpoints recorded their layout
        if saved.num_processes == new["num_processes"]:
            return None
        raise CheckpointError(f"{checkpoint} was written by {saved.num_processes} process(es) before checkpoints "
                              f"recorded their batch size and steps per epoch: resume it with "
                              f"{saved.num_processes} process(es)")
    if old == new:
        return None
    position, per_step = saved.position, _samples_per_step(new)
    if position.samples_done % per_step:
        raise CheckpointError(
            f"{checkpoint} stopped {position.samples_done} samples into epoch {position.epoch}, not a multiple of "
            f"this run's {per_step} samples per optimizer step ({_describe(new)}): resume with the checkpoint's "
            f"{_describe(old)}, or from a checkpoint at an epoch's end")
    position.batch = position.samples_done // (new["batch_size"] * new["num_processes"])
    old_per_step, old_epoch, new_epoch = _samples_per_step(old), old["steps_per_epoch"], new["steps_per_epoch"]

    def step_of(step: int) -> int:
        epoch, within = divmod(step, old_epoch)
        return epoch * new_epoch + min(new_epoch, within * old_per_step // per_step)

    warnings.warn(f"resuming a checkpoint of {_describe(old)} with {_describe(new)}: the position maps onto this "
                  f"run's steps by the samples done (epoch {position.epoch}, batch {position.batch}); training "
                  "continues correctly but not bit-identically")
    return step_of


def _saved_optimizer_settings(saved: TrainingState) -> dict:
    """The checkpoint's optimizer settings; for one written before they were recorded, its first group's."""
    if saved.optimizer_settings is not None:
        return saved.optimizer_settings
    first = saved.optimizer["param_groups"][0]
    return {"lr": first.get("initial_lr", first["lr"]), "weight_decay": first.get("weight_decay"),
            "momentum": first.get("momentum")}


def apply_optimizer_settings(optimizer, saved: dict, current: dict) -> list[str]:
    """Scale every param group's setting by current / saved where they differ (set it where the
    saved one was 0); returns one line per setting changed."""
    lines = []
    for name, new in current.items():
        old = saved.get(name)
        if old is None or old == new:
            continue
        key = "initial_lr" if name == "lr" else name
        for group in optimizer.param_groups:
            group[key] = group[key] * new / old if old else new
        how = f"every param group's {key} scaled by {new / old:g}" if old else f"every param group's {key} set"
        lines.append(f"{name} {new:g} applied from the resume point on (checkpoint had {old:g}): {how}")
    return lines


def _schedule_changes(saved: dict, current: dict) -> list[str]:
    changed = [f"{label}: {current[key]}{' steps' if key != 'kind' else ''} (checkpoint had {saved[key]})"
               for key, label in SCHEDULE_SETTINGS.items() if key in saved and saved[key] != current[key]]
    return ["; ".join(changed)] if changed else []
