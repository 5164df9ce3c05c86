"""The correctness holes a review found (issue 12), each pinned by a test that failed before its fix:
a requeue over corrupt checkpoints, the same step saved twice, feature caches that were not valid
or outlived their run, tagged timm names, the image scan's barrier, fp16 NaN reporting, internal
bugs disguised as user errors, and preemption handling off the main thread."""

from __future__ import annotations

import math
import threading
import warnings

import accelerate
import pytest
import torch
import torchvision
from conftest import BACKBONE, nan_head_from_epoch_1, tiny_trainer, write_image_folder
from safetensors.torch import load_file
from torch import nn

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.errors import CheckpointError, ConfigError, NonFiniteLossError
from dist_finetune.checkpoint import read_metadata
from dist_finetune.feature_cache import backbone_is_static
from dist_finetune.run_files import read_jsonl


def task(data=None) -> ImageClassifier:
    seed_everything(0)
    return ImageClassifier(3 if data is None else data.num_classes, backbone=BACKBONE, pretrained=False)


def test_resume_latest_over_only_corrupt_checkpoints_is_refused_and_loses_nothing(tiny_data, tmp_path):
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path)).finetune(task(), tiny_data, "no_freeze")
    for checkpoint in (tmp_path / "checkpoints").glob("step-*"):
        model = checkpoint / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF  # same size: only the SHA-256 can tell
        model.write_bytes(bytes(data))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"every checkpoint in .*checkpoints is corrupt or incomplete "
                                              r"\(step-00000006, step-00000012\): refusing to start over"):
        tiny_trainer(max_epochs=2, output_dir=str(tmp_path)).finetune(task(), tiny_data, "no_freeze", resume="latest")
    assert (tmp_path / "metrics.jsonl").read_text() == before


class CheckpointInodes(Callback):
    """Remembers the inode of every checkpoint folder the first time it is seen, and every later sighting."""

    def __init__(self):
        self.seen: dict[str, set[int]] = {}

    def _look(self, run) -> None:
        for folder in (run.output_dir / "checkpoints").glob("step-*"):
            self.seen.setdefault(folder.name, set()).add(folder.stat().st_ino)

    def on_step_end(self, trainer, run) -> None:
        self._look(run)

    def on_validation_end(self, trainer, run, record) -> None:  # after the last step, before the epoch's save
        self._look(run)

    def on_epoch_start(self, trainer, run) -> None:
        self._look(run)


def test_a_step_is_saved_once_when_the_cadence_divides_the_epoch(tiny_data, tmp_path):
    """6 steps per epoch, a cadence of 3: step 6 ends epoch 0; rewriting it in place (rmtree, then
    rename) would leave a moment without that checkpoint."""
    watcher = CheckpointInodes()
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path), save_every_n_steps=3, keep_last=5,
                 callbacks=[watcher]).finetune(task(), tiny_data, "no_freeze")
    assert sorted(watcher.seen) == ["step-00000003", "step-00000006", "step-00000009"]
    assert all(len(inodes) == 1 for inodes in watcher.seen.values()), watcher.seen
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-00000003", "step-00000006", "step-00000009", "step-00000012"]


def test_static_backbone_ignores_zero_rate_dropout_but_not_stochastic_depth():
    from torchvision.ops import StochasticDepth

    def frozen(*modules) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), *modules).requires_grad_(False).train()

    assert backbone_is_static(frozen(nn.Dropout(p=0.0)))  # ViT's default dropout: nothing random
    assert not backbone_is_static(frozen(nn.Dropout(p=0.1)))
    assert not backbone_is_static(frozen(StochasticDepth(0.1, "row")))
    assert backbone_is_static(frozen(StochasticDepth(0.0, "row")))
    convnext = torchvision.models.convnext_tiny().requires_grad_(False).train()
    assert not backbone_is_static(convnext), "ConvNeXt's stochastic depth is active in train mode"
    assert backbone_is_static(convnext.eval())


def test_a_second_finetune_never_reuses_the_first_runs_cached_features(image_folders, tmp_path, capsys):
    other = write_image_folder(tmp_path / "other", per_class=6, seed=7)
    settings = dict(image_size=32, batch_size=4, num_workers=0, augment=False)
    first = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"), **settings)
    second = ImageClassificationData.from_folders(str(other), str(image_folders / "val"), **settings)
    trainer = tiny_trainer(max_epochs=1)
    trainer.finetune(task(), first, "freeze")
    reused = task()
    trainer.finetune(reused, second, "freeze")
    fresh = task()
    tiny_trainer(max_epochs=1).finetune(fresh, second, "freeze")
    printed = capsys.readouterr().out
    assert "cached frozen backbone features of 24 images" in printed
    assert printed.count("cached frozen backbone features of 18 images") == 2
    assert all(torch.equal(a, b) for a, b in zip(reused.head.parameters(), fresh.head.parameters()))


def test_timm_names_with_a_pretrained_tag_are_accepted():
    from dist_finetune.backbones import build_backbone

    assert build_backbone("timm:test_resnet.r160_in1k", pretrained=False).name == "timm:test_resnet.r160_in1k"


def test_no_process_waits_in_a_barrier_while_another_scans_the_images(tiny_data, monkeypatch):
    """The scan is split over every rank (test_distributed runs it under a 5 s timeout): neither
    main_process_first nor local_main_process_first, whose barrier would outlast NCCL's timeout."""
    used = []
    for name in ("main_process_first", "local_main_process_first"):
        original = getattr(accelerate.Accelerator, name)

        def recording(self, _name=name, _original=original):
            used.append(_name)
            return _original(self)

        monkeypatch.setattr(accelerate.Accelerator, name, recording)
    tiny_trainer(max_epochs=1).finetune(task(), tiny_data, "freeze")
    assert used == []


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


def test_only_user_errors_become_one_line_internal_errors_keep_their_traceback(monkeypatch, capsys):
    from dist_finetune import cli, recipe

    def broken(config, **options):
        raise ValueError("an internal bug")

    monkeypatch.setattr(recipe, "finetune_from_config", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["train", "--train-folder", "x"])

    def user_error(config, **options):
        raise ConfigError("fix the setting")

    monkeypatch.setattr(recipe, "finetune_from_config", user_error)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--train-folder", "x"])
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == "dist-finetune train: error: fix the setting"


def test_finetune_outside_the_main_thread_warns_that_preemption_is_off(tiny_data):
    caught = []

    def run():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiny_trainer(max_epochs=1).finetune(task(), tiny_data, "freeze")
        caught.extend(str(w.message) for w in seen)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert any("outside the main thread" in message and "preemption handling is off" in message
               for message in caught), caught
