"""The loss guard: skipped (non-finite) fp16 steps left out of the train loss, and the checks that run before
every checkpoint, so that no checkpoint is written after a non-finite loss or from non-finite weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_trainer

from dist_finetune import ImageClassifier
from dist_finetune.callbacks import Callback, Position
from dist_finetune.errors import NonFiniteLossError
from dist_finetune.loss_guard import LossGuard


def test_steps_the_grad_scaler_skips_are_left_out_of_the_train_loss():
    """With a GradScaler a non-finite step is skipped, not fatal: the mean is over the finite batches' images."""
    with_scaler = SimpleNamespace(scaler=object(), device=torch.device("cpu"), num_processes=1, is_main_process=True)
    guard = LossGuard(with_scaler, check_every_n_steps=10)
    position = Position()
    guard.start_epoch(position)
    for loss, images in ((2.0, 4), (math.nan, 4), (4.0, 2), (math.inf, 3)):
        guard.add(torch.tensor(loss), images, step_done=True)
    totals = guard.end_epoch(position, None)  # 4 steps < 10 lost in a row: no stop
    assert totals.mean_loss == pytest.approx((2.0 * 4 + 4.0 * 2) / 6)
    assert (totals.images, totals.finite_images, totals.non_finite) == (13, 6, 2)
    assert (position.seen, position.lost_images) == (13, 7)


class Poison(Callback):
    """At the end of optimizer step ``step``, fill one tensor with NaN (before the cadence save sees the step)."""

    def __init__(self, step: int, tensor_of):
        self.step, self.tensor_of = step, tensor_of

    def on_step_end(self, trainer, run):
        if run.position.global_step == self.step:
            with torch.no_grad():
                self.tensor_of(run.task).fill_(math.nan)


def run_poisoned(tiny_data, output_dir, poison: Poison):
    """check_every_n_steps 10, a cadence save every 4 steps: the save at step 4 is the first check."""
    trainer = tiny_trainer(max_epochs=1, output_dir=str(output_dir), save_every_n_steps=4, check_every_n_steps=10,
                           callbacks=[poison])
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, "no_freeze")
    assert not (output_dir / "checkpoints").exists() or not any((output_dir / "checkpoints").iterdir())
    assert not (output_dir / "model.safetensors").exists()
    return str(stopped.value)


def test_a_non_finite_loss_between_checks_is_found_before_the_next_checkpoint(tiny_data, tmp_path):
    """The head goes NaN after step 2, so steps 3 and 4 have NaN losses; the periodic check (every 10) would come
    after the save at step 4, so the check that stops the run is the one every save runs first."""
    message = run_poisoned(tiny_data, tmp_path, Poison(2, lambda task: task.head.layers[-1].weight))
    assert message.startswith("non-finite training loss in epoch 0 by step 4 (checked every 10 steps); "
                              "last good checkpoint: none")


def test_no_checkpoint_from_non_finite_weights_after_finite_losses(tiny_data, tmp_path):
    """A BatchNorm statistic goes NaN right before the save at step 4: every loss so far was finite."""
    message = run_poisoned(tiny_data, tmp_path, Poison(4, lambda task: task.backbone.bn1.running_var))
    assert message.startswith("not writing a checkpoint: non-finite values in backbone.bn1.running_var; "
                              "last good checkpoint: none")
