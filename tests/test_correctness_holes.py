"""The correctness holes a review found (issue 12), each pinned by a test that failed before its fix:
a requeue over corrupt checkpoints, the same step saved twice, feature caches that were not valid
or outlived their run, tagged timm names, the image scan's barrier, fp16 NaN reporting, internal
bugs disguised as user errors, and preemption handling off the main thread."""

from __future__ import annotations

import threading
import warnings

import accelerate
import pytest
import torch
import torchvision
from conftest import BACKBONE, nan_head_from_epoch_1, tiny_trainer, write_image_folder
from torch import nn

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.errors import CheckpointError, ConfigError, NonFiniteLossError
from dist_finetune.feature_cache import backbone_is_static


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


@pytest.mark.parametrize("precision, step", [("no", 8), ("fp16", 12)])
def test_non_finite_losses_under_fp16_stop_once_a_whole_check_window_is_lost(tiny_data, precision, step):
    """Checks at steps 4, 8, 12; NaN from step 7. fp16 takes a NaN loss for a step the GradScaler
    skips and stops only when every loss since the last check was non-finite (window 9-12); other
    precisions stop at the first check that sees one (8)."""
    trainer = tiny_trainer(max_epochs=2, check_every_n_steps=4, mixed_precision=precision)
    with pytest.raises(NonFiniteLossError, match=f"in epoch 1 by step {step} "):
        trainer.finetune(task(), tiny_data, nan_head_from_epoch_1())


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
