"""The loss guard: a non-finite loss stops the run (fp16 with and without a GradScaler, across epochs and
ranks), skipped (non-finite) fp16 steps are left out of the train loss, and the checks that run before every
checkpoint: no checkpoint or model file is written after a non-finite loss or from non-finite weights."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import nan_head_from_epoch_1, task, tiny_trainer
from safetensors.torch import load_file

from dist_finetune import ImageClassificationData, ImageClassifier
from dist_finetune.callbacks import Callback, Position
from dist_finetune.checkpoint import read_metadata
from dist_finetune.errors import NonFiniteLossError
from dist_finetune.loss_guard import LossGuard
from dist_finetune.run_files import read_jsonl


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


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """fp16 as on a GPU: accelerate gives an fp16 run on the CPU no GradScaler (NaN gradients are then
    applied), so this hands the trainer's accelerator a real CPU ``torch.amp.GradScaler``; accelerate's
    own backward, optimizer step and ``optimizer_step_was_skipped`` then scale, skip and report as on
    a GPU. Autocast stays off (fp32 math), which the skip logic does not depend on."""
    from dist_finetune import trainer as trainer_module

    def with_scaler(*args, **kwargs):
        accelerator = make_accelerator(*args, **kwargs)
        if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
            accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    make_accelerator = trainer_module.make_accelerator
    monkeypatch.setattr(trainer_module, "make_accelerator", with_scaler)


class NanTrainingLoss(Callback):
    """The logits of the training batches ``poisoned(index)`` picks (index counted over the run, 6
    per epoch) become NaN, in train mode only: the loss is NaN, validation is not, and under a
    GradScaler those steps are skipped."""

    def __init__(self, poisoned):
        self.poisoned, self.batch = poisoned, -1

    def setup(self, trainer, run) -> None:
        run.task.head.register_forward_hook(self._poison)

    def _poison(self, module, inputs, output):
        if not module.training:
            return output
        self.batch += 1
        return output * float("nan") if self.poisoned(self.batch) else output


@pytest.mark.parametrize("precision, step", [("no", 8), ("fp16", 12)])
def test_non_finite_losses_under_fp16_stop_once_a_whole_check_window_is_lost(tiny_data, cpu_grad_scaler, precision,
                                                                             step):
    """Checks at steps 4, 8, 12; NaN from step 7. Under a GradScaler fp16 takes a NaN loss for a step
    the scaler skips and stops at the first check after 4 lost optimizer steps in a row (12); other
    precisions stop at the first check that sees one (8)."""
    trainer = tiny_trainer(max_epochs=2, check_every_n_steps=4, log_every_n_steps=4, mixed_precision=precision)
    with pytest.raises(NonFiniteLossError, match=f"in epoch 1 by step {step} "):
        trainer.finetune(task(), tiny_data, nan_head_from_epoch_1())


def test_fp16_without_a_grad_scaler_stops_at_the_first_non_finite_loss(tiny_data):
    """On the CPU accelerate has no GradScaler for fp16: a NaN loss is applied, not skipped."""
    trainer = tiny_trainer(max_epochs=2, check_every_n_steps=4, mixed_precision="fp16")
    with pytest.raises(NonFiniteLossError, match="in epoch 1 by step 8 "):
        trainer.finetune(task(), tiny_data, nan_head_from_epoch_1())
    assert trainer.accelerator.scaler is None


def test_fp16_guard_counts_lost_steps_across_epochs(tiny_data, cpu_grad_scaler):
    """6 steps per epoch, checks every 10 and at epoch ends: every loss from step 7 on is NaN
    (validation stays finite). The check at the end of epoch 2 (step 18) is the first after 10 lost
    steps in a row; a window that restarted each epoch never saw 10 steps, and the run finished."""
    trainer = tiny_trainer(max_epochs=5, check_every_n_steps=10, mixed_precision="fp16",
                           callbacks=[NanTrainingLoss(lambda batch: batch >= 6)])
    with pytest.raises(NonFiniteLossError, match=r"in epoch 2 by step 18 .*the last 10 optimizer steps all had one"):
        trainer.finetune(task(), tiny_data, "no_freeze")


class TwoThreadRanks:
    """Two LossGuard "ranks" in threads whose accelerator sums a tensor over both, as an all-reduce would."""

    def __init__(self):
        self.slots, self.barrier = [None, None], threading.Barrier(2)

    def accelerator(self, rank: int):
        from types import SimpleNamespace

        def reduce(tensor, reduction):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return SimpleNamespace(scaler=object(), device=torch.device("cpu"), num_processes=2,
                               is_main_process=rank == 0, reduce=reduce)


@pytest.mark.parametrize("clean_step", [None, 5])
def test_fp16_guard_sees_non_finite_losses_that_move_between_ranks(clean_step):
    """Under DDP one rank's overflow makes every rank's GradScaler skip the step. Losses NaN on rank 0 at
    even steps and on rank 1 at odd ones: every step was skipped, but neither rank had 8 in a row, so a
    per-rank count never stopped the run. One step finite on both ranks (clean_step) is not a lost window."""
    from dist_finetune.callbacks import Position
    from dist_finetune.loss_guard import LossGuard

    ranks, outcomes = TwoThreadRanks(), [None, None]

    def rank(index: int) -> None:
        guard = LossGuard(ranks.accelerator(index), check_every_n_steps=8)
        guard.start_epoch(Position())
        for step in range(12):
            lost = step % 2 == index and step != clean_step
            guard.add(torch.tensor(math.nan if lost else 1.0), images=2, step_done=True)
        try:
            outcomes[index] = guard.check(Position(global_step=12), None)
        except NonFiniteLossError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=rank, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if clean_step is None:
        assert all(isinstance(o, NonFiniteLossError) and "the last 8 optimizer steps all had one" in str(o)
                   for o in outcomes), outcomes
    else:  # steps 4-11 hold the finite step 5
        assert all(o.lost_window is False and o.non_finite == 11 for o in outcomes), outcomes


def test_train_loss_is_the_mean_of_the_finite_losses_never_0_for_an_all_nan_epoch(tiny_data, cpu_grad_scaler,
                                                                                   tmp_path, monkeypatch, capsys):
    """Epoch 1: every loss NaN; epoch 2: every other one. The non-finite ones were left out of the loss
    sum but not of its divisor (epoch 1 printed train_loss 0.0)."""
    training_losses = []  # (loss, batch size) of every training batch, as the trainer computed them
    cross_entropy = torch.nn.functional.cross_entropy

    def recording(logits, labels, **kwargs):
        loss = cross_entropy(logits, labels, **kwargs)
        if torch.is_grad_enabled():  # not validation
            training_losses.append((loss.item(), labels.numel()))
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    poison = NanTrainingLoss(lambda batch: 6 <= batch < 12 or (batch >= 12 and batch % 2 == 0))
    trainer = tiny_trainer(max_epochs=3, check_every_n_steps=100, mixed_precision="fp16", output_dir=str(tmp_path),
                           callbacks=[poison])
    trainer.finetune(task(), tiny_data, "no_freeze")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["train_images"], r["nonfinite_losses"]) for r in records] == [(24, 0), (24, 6), (24, 3)]
    assert math.isnan(records[1]["train_loss"]) and "epoch 1: train_loss nan " in capsys.readouterr().out
    finite = [(loss, n) for loss, n in training_losses[12:] if math.isfinite(loss)]
    assert len(finite) == 3
    assert records[2]["train_loss"] == pytest.approx(sum(loss * n for loss, n in finite) / sum(n for _, n in finite),
                                                     rel=1e-12)


def test_a_non_finite_validation_stops_the_run_before_any_nan_file_is_written(tiny_data, cpu_grad_scaler, tmp_path):
    """fp16, the head NaN from epoch 1: its training steps are skipped (6 < 10: the guard has not
    fired) and its validation is NaN. NaN compared as an improvement, so model.safetensors and the
    epoch's checkpoint got NaN weights, and the run ended in a ValueError from the report."""
    trainer = tiny_trainer(max_epochs=3, check_every_n_steps=10, mixed_precision="fp16", output_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"non-finite validation after epoch 1 \(val_loss nan.*last good "
                                                 r"checkpoint: .*step-00000006\."):
        trainer.finetune(task(), tiny_data, nan_head_from_epoch_1())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0]
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == 0
    assert_no_file_holds_nan(tmp_path)


def assert_no_file_holds_nan(folder) -> None:
    files = list(folder.rglob("*.safetensors"))
    assert files
    for path in files:
        for name, tensor in load_file(path).items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), f"{path}: {name}"


class PoisonBatchNormStatistics(Callback):
    """Fills the first BatchNorm's running mean with NaN at ``hook`` of epoch 1. In train mode
    BatchNorm normalises with batch statistics, so the training loss stays finite."""

    def __init__(self, hook: str):
        setattr(self, hook, self._poison)

    def _poison(self, trainer, run, *record) -> None:
        if run.position.epoch == 1:
            run.task.backbone.bn1.running_mean.fill_(float("nan"))


@pytest.mark.parametrize("hook, refused", [("on_step_end", "a checkpoint"),
                                           ("on_validation_end", r".*model\.safetensors")])
def test_no_checkpoint_or_model_file_holds_nan_weights(tiny_data, tmp_path, hook, refused):
    """NaN BatchNorm statistics with a finite loss: a cadence save (every 2 steps) or the best
    model's file would have written them."""
    trainer = tiny_trainer(max_epochs=3, save_every_n_steps=2, output_dir=str(tmp_path),
                           callbacks=[PoisonBatchNormStatistics(hook)])
    expected = rf"not writing {refused}: non-finite values in backbone\.bn1\.running_mean; last good checkpoint: "
    with pytest.raises(NonFiniteLossError, match=expected + r".*step-000000\d\d\."):
        trainer.finetune(task(), tiny_data, "no_freeze")
    assert_no_file_holds_nan(tmp_path)


@pytest.mark.parametrize("check_every, step", [(1, 7), (10, 10)])
def test_non_finite_loss_stops_with_epoch_step_and_last_checkpoint(image_folders, tmp_path, check_every, step):
    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    trainer = tiny_trainer(max_epochs=2, output_dir=str(tmp_path), check_every_n_steps=check_every)
    expected = rf"in epoch 1 by step {step} \(checked every {check_every} steps\); last good checkpoint: .*step-00000006"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data, nan_head_from_epoch_1())
    # the model file is the best finished epoch's (0), never a poisoned one
    kept = ImageClassifier.load_from_checkpoint(tmp_path / "model.safetensors")
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values())
    assert not (tmp_path / "last.safetensors").exists()
