"""Resume in one process: what a resumed run takes over from its checkpoint or refuses (another run, another
batch size, a changed lr, weight decay or momentum, a longer schedule), checkpoints of older versions, the RNG
state, a checkpoint rewritten at its step. Processes killed and resumed: integration/test_resume_killed.py."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from dist_finetune.errors import CheckpointError


def test_resume_latest_without_checkpoints_starts_fresh(image_folders, tmp_path):
    """``resume="latest"`` over an output dir without checkpoints is the same run as no resume at all."""
    from conftest import tiny_trainer

    from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything

    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    weights = []
    for name, resume in (("latest", "latest"), ("plain", None)):
        seed_everything(0)
        task = ImageClassifier(3, "tiny_resnet", pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(tmp_path / name), load_best_model_at_end=False)
        trainer.finetune(task, data, ("freeze_unfreeze", 1), resume=resume)
        assert trainer.run.resumed_from is None
        weights.append(task.state_dict())
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[1])


def test_resume_refuses_another_run(image_folders, tmp_path):
    """A checkpoint of a tiny_resnet, 3-class, 32 px "freeze" run is continued by nothing else: another
    backbone, strategy, class set, image size, image list, seed, optimizer, layer decay, dedupe, class
    weights or balanced sampler is refused
    before anything trains; so is a fresh run over it; a checkpoint folder without its manifest is
    incomplete. The same images in a moved folder are the same image list."""
    from conftest import tiny_trainer, write_image_folder

    from dist_finetune import ImageClassificationData, ImageClassifier
    from dist_finetune.run_signature import image_lists
    from dist_finetune.training_state import find_checkpoint

    def data(train=image_folders / "train", size=32, **options):
        return ImageClassificationData.from_folders(str(train), val_split=0.25, image_size=size, batch_size=4,
                                                    num_workers=0, augment=False, **options)

    out = str(tmp_path / "run")
    tiny_trainer(max_epochs=1, output_dir=out).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data(),
                                                        "freeze")
    other_classes = write_image_folder(tmp_path / "other", classes=("blue", "green", "violet"), per_class=8)
    fewer = shutil.copytree(image_folders / "train", tmp_path / "fewer" / "train")
    (fewer / "red" / "red_7.png").unlink()
    moved = shutil.copytree(image_folders / "train", tmp_path / "moved" / "train")
    lists = [image_lists(d.train_paths, d.train_labels, d.val_paths, d.val_labels) for d in (data(), data(moved))]
    assert lists[0] == lists[1]
    for backbone, strategy, dataset, settings, difference in (
        ("resnet18", "freeze", data(), {}, r"backbone: checkpoint has 'tiny_resnet', this run has 'resnet18'"),
        ("tiny_resnet", "no_freeze", data(), {}, r"strategy: checkpoint has \{[^}]*'name': 'Freeze'[^}]*\}, "
                                                 r"this run has \{[^}]*'name': 'NoFreeze'"),
        ("tiny_resnet", "freeze", data(other_classes), {},
         r"classes: checkpoint has \['blue', 'green', 'red'\], this run has \['blue', 'green', 'violet'\]"),
        ("tiny_resnet", "freeze", data(size=48), {}, r"image_size: checkpoint has 32, this run has 48"),
        ("tiny_resnet", "freeze", data(fewer), {},
         r"train_images: checkpoint has '18 images [0-9a-f]{16}', this run has '17 images [0-9a-f]{16}'"),
        ("tiny_resnet", "freeze", data(), {"seed": 1}, r"seed: checkpoint has 0, this run has 1"),
        ("tiny_resnet", "freeze", data(), {"optimizer": "sgd"},
         r"optimizer: checkpoint has 'adamw', this run has 'sgd'"),
        ("tiny_resnet", "freeze", data(), {"layer_decay": 0.5}, r"layer_decay: checkpoint has None, this run has 0.5"),
        # README: a resume must keep dedupe, class_weights and balanced_sampler
        ("tiny_resnet", "freeze", data(dedupe=True), {}, r"data: checkpoint has None, this run has \{'dedupe': True"),
        ("tiny_resnet", "freeze", data(class_weights="auto"), {},
         r"data: checkpoint has None, this run has \{[^}]*'class_weights': 'auto'"),
        ("tiny_resnet", "freeze", data(balanced_sampler=True), {},
         r"data: checkpoint has None, this run has \{[^}]*'balanced_sampler': True"),
    ):
        task = ImageClassifier(3, backbone, pretrained=False)
        before = {n: p.clone() for n, p in task.named_parameters()}
        with pytest.raises(CheckpointError, match="belongs to a different run") as refused:
            tiny_trainer(max_epochs=2, output_dir=out, **settings).finetune(task, dataset, strategy, resume="latest")
        assert re.search(difference, str(refused.value)), str(refused.value)
        assert all(torch.equal(before[n], p) for n, p in task.named_parameters()), "refused before training"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        tiny_trainer(max_epochs=2, output_dir=out).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False),
                                                            data(), "freeze")
    broken = tmp_path / "run" / "checkpoints" / "step-00000099"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(str(broken), None)


def test_a_checkpoint_from_before_initial_denom_lr_is_read_as_lr_over_10(tmp_path):
    """Built-in strategies' checkpoints written before ``initial_denom_lr`` was a setting added groups at
    lr / 10: they resume with --initial-denom-lr 10 and are refused, naming the setting, under the new 100."""
    from dist_finetune.finetuning import FreezeUnfreeze, UnfreezeMilestones
    from dist_finetune.run_signature import check_signature

    for strategy in (FreezeUnfreeze, UnfreezeMilestones):
        old = {k: v for k, v in strategy().describe().items() if k != "initial_denom_lr"}
        check_signature({"strategy": old}, {"strategy": strategy(initial_denom_lr=10).describe()}, tmp_path)
        with pytest.raises(CheckpointError, match=r"'initial_denom_lr': 10.0\}, this run has \{.*'initial_denom_lr'"
                                                  r": 100.0\}"):
            check_signature({"strategy": old}, {"strategy": strategy().describe()}, tmp_path)
        assert "initial_denom_lr" not in old  # the checkpoint's own record is left as it was read


def test_a_longer_max_epochs_extends_the_schedule(tiny_data, tmp_path, capsys):
    """A finished 2-epoch run (6 steps an epoch) resumed with max_epochs 4: the cosine runs over 24 steps,
    continuing at step 13 (it did not train the added epochs at lr 0); resumed again, nothing is left."""
    from test_model_selection import StopAt, finetune

    finetune(tiny_data, tmp_path, "no_freeze", max_epochs=2)
    probe = StopAt()
    finetune(tiny_data, tmp_path, "no_freeze", callbacks=[probe], resume="latest", max_epochs=4)
    assert sorted(probe.lrs) == list(range(13, 25))
    for step, lrs in probe.lrs.items():
        assert lrs == [pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * step / 24)), abs=1e-12)], step
    assert "schedule horizon: 24 steps (checkpoint had 12)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="at the end of epoch 3: with max_epochs 4 nothing is left to train"):
        finetune(tiny_data, tmp_path, "no_freeze", resume="latest", max_epochs=4)


def test_another_batch_size_continues_by_samples_done_or_is_refused(image_folders, tiny_data, tmp_path):
    """Stopped after step 3 of batch 4 (checkpoints at 8 and 12 samples into epoch 0): batch 8 cannot continue
    at 12 samples (refused, naming both layouts); batch 2 continues at 8 samples = batch 4 of 12 an epoch,
    every image of epoch 0 once, on a cosine over 2 x 12 steps from its step 4 (global steps 3-22)."""
    from dist_finetune import ImageClassificationData
    from test_model_selection import Interrupt, StopAt, finetune

    def data(batch_size):
        return ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                    image_size=32, batch_size=batch_size, num_workers=0)

    settings = dict(max_epochs=2, save_every_n_steps=1)
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, "no_freeze", callbacks=[StopAt(4)], **settings)
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=re.escape(
            "stopped 12 samples into epoch 0, not a multiple of this run's 8 samples per optimizer step (batch_size 8 "
            "x 1 process(es) x 1 accumulation step(s)): resume with the checkpoint's batch_size 4 x 1 process(es) x 1 "
            "accumulation step(s)")):
        finetune(data(8), tmp_path, "no_freeze", resume=str(root / "step-00000003"), **settings)
    probe = StopAt()
    with pytest.warns(UserWarning, match="resuming a checkpoint of batch_size 4 x 1 process.* with batch_size 2"):
        _, _, metrics = finetune(data(2), tmp_path, "no_freeze", callbacks=[probe],
                                 resume=str(root / "step-00000002"), **settings)
    assert sorted(probe.lrs) == list(range(3, 23))
    for step, lrs in probe.lrs.items():
        assert lrs == [pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * (step + 2) / 24)), abs=1e-12)], step
    assert [m["train_images"] for m in metrics] == [24, 24]


def test_a_changed_lr_weight_decay_and_momentum_apply_from_the_resume_point(tiny_data, tmp_path, capsys):
    """SGD, constant schedule, the backbone joined at epoch 1 at lr / initial_denom_lr; resumed at step 8 with
    a 10x lower lr, another weight decay and momentum: both groups train at the new lr, keeping their ratio."""
    from test_model_selection import Interrupt, StopAt, finetune

    from dist_finetune.finetuning import DEFAULT_INITIAL_DENOM_LR, FreezeUnfreeze

    settings = dict(max_epochs=2, optimizer="sgd", scheduler="constant", unfreeze_warmup_epochs=0,
                    save_every_n_steps=1)
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, FreezeUnfreeze(unfreeze_epoch=1), callbacks=[StopAt(9)], lr=1e-2,
                 weight_decay=1e-4, momentum=0.9, **settings)
    probe = StopAt()
    trainer, _, _ = finetune(tiny_data, tmp_path, FreezeUnfreeze(unfreeze_epoch=1), callbacks=[probe],
                             resume="latest", lr=1e-3, weight_decay=5e-4, momentum=0.5, **settings)
    assert sorted(probe.lrs) == list(range(9, 13))
    assert all(lrs == pytest.approx([1e-3, 1e-3 / DEFAULT_INITIAL_DENOM_LR]) for lrs in probe.lrs.values())
    groups = trainer.run.optimizer.param_groups
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [pytest.approx((5e-4, 0.5))] * 2
    out = capsys.readouterr().out
    for line in ("lr 0.001 applied from the resume point on (checkpoint had 0.01): every param group's initial_lr "
                 "scaled by 0.1", "weight_decay 0.0005 applied from the resume point on (checkpoint had 0.0001)",
                 "momentum 0.5 applied from the resume point on (checkpoint had 0.9)"):
        assert line in out


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tiny_data, tmp_path):
    """Resumed from step 10 of a finished run (steps 10-12 kept), the abandoned 11 and 12 move to
    checkpoints/abandoned-*/; the new step 11 survives keep_last=1 and so does the checkpoint resumed from;
    after a stop at step 12, "latest" is the new 11."""
    from test_model_selection import Interrupt, StopAt, finetune

    finetune(tiny_data, tmp_path, "no_freeze", max_epochs=2, save_every_n_steps=1, keep_last=3)
    root = tmp_path / "checkpoints"
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, "no_freeze", callbacks=[StopAt(12)], resume=str(root / "step-00000010"),
                 max_epochs=2, save_every_n_steps=1, keep_last=1)
    aside = list(root.glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000011", "step-00000012"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000011"]
    trainer, _, _ = finetune(tiny_data, tmp_path, "no_freeze", resume="latest", max_epochs=2, save_every_n_steps=1,
                             keep_last=1)
    assert trainer.run.resumed_from.name == "step-00000011" and trainer.run.last_checkpoint.is_dir()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000011", "step-00000012"]


def test_a_checkpoint_from_before_the_seed_optimizer_and_image_records_is_not_refused_for_lacking_them(tmp_path):
    """Older checkpoints' signatures lack the seed, optimizer and image lists: those are not compared; a
    recorded one that differs is refused."""
    from dist_finetune.run_signature import check_signature

    current = {"backbone": "tiny_resnet", "seed": 0, "optimizer": "adamw", "train_images": "18 images 0123456789abcdef",
               "val_images": "6 images fedcba9876543210"}
    check_signature({"backbone": "tiny_resnet"}, current, tmp_path)
    with pytest.raises(CheckpointError, match="seed: checkpoint has 1, this run has 0"):
        check_signature({"backbone": "tiny_resnet", "seed": 1}, current, tmp_path)


class FakeCudaRng:
    """torch.cuda's RNG functions on a node with ``count`` GPUs and no real one: device i's state is i."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.restored: list[tuple[int, int]] = []  # (device, the state's value)
        for name, value in {"is_available": lambda: True, "device_count": lambda: count,
                            "current_device": lambda: current, "get_rng_state": self.get,
                            "get_rng_state_all": lambda: [self.get(i) for i in range(count)],
                            "set_rng_state": self.set,
                            "set_rng_state_all": lambda states: [self.set(s, i) for i, s in enumerate(states)]}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        self.count = count

    def get(self, device="cuda") -> torch.Tensor:
        index = torch.device(device).index if not isinstance(device, int) else device
        return torch.full((8,), index, dtype=torch.uint8)

    def set(self, state: torch.Tensor, device="cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        if index >= self.count:
            raise IndexError(f"no GPU {index} among {self.count}")
        self.restored.append((index, int(state[0])))


def test_rng_saves_and_restores_only_this_process_cuda_device(monkeypatch):
    """Rank 3 of a 1 x 8 node saves its own GPU's state and no other; restored on another node layout
    (its device is cuda:1 of 4 there) it lands on its own device."""
    from dist_finetune.training_state import capture_rng, restore_rng

    FakeCudaRng(monkeypatch, count=8, current=3)
    tensors, extra = capture_rng(torch.device("cuda", 3))
    assert sorted(tensors) == ["cuda", "numpy", "torch"]
    assert tensors["cuda"].tolist() == [3] * 8
    fake = FakeCudaRng(monkeypatch, count=4, current=1)
    restore_rng(tensors, extra, torch.device("cuda", 1))
    assert fake.restored == [(1, 3)]


def test_rng_of_an_old_checkpoint_with_every_gpu_state(monkeypatch):
    """Checkpoints that held every visible GPU's state (cuda0..cuda11, where text order puts cuda10
    before cuda2) restore this process's device's entry on a machine of as many GPUs; on another layout
    (1 x 12 resumed as 3 x 4: device 2 is now another rank's) a warning and no restore."""
    from dist_finetune.training_state import capture_rng, restore_rng

    FakeCudaRng(monkeypatch, count=12, current=0)
    tensors, extra = capture_rng(torch.device("cpu"))
    assert "cuda" not in tensors, "a CPU process saves no CUDA state"
    old = {**tensors, **{f"cuda{i}": torch.full((8,), 100 + i, dtype=torch.uint8) for i in range(12)}}
    fake = FakeCudaRng(monkeypatch, count=12, current=10)
    restore_rng(old, extra, torch.device("cuda", 10))
    assert fake.restored == [(10, 110)]
    fake = FakeCudaRng(monkeypatch, count=4, current=2)
    with pytest.warns(UserWarning, match=r"no CUDA RNG state for this process's device cuda:2 .*12 GPU.*shows 4"
                                         r".*not bit-exact"):
        restore_rng(old, extra, torch.device("cuda", 2))
    assert fake.restored == []


def test_a_checkpoint_written_again_at_its_step_is_replaced_never_missing(tiny_data, tmp_path, monkeypatch):
    """A preemption at an epoch's last step and the resumed run's epoch-end save share a step number: the
    second write replaces the folder (perhaps the one resumed from). It was deleted before its
    replacement was in place; a crash between the two now leaves it aside, and the next write restores it."""
    import os

    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier, seed_everything
    from dist_finetune.training_state import verify

    seed_everything(0)
    trainer = tiny_trainer(max_epochs=1, output_dir=str(tmp_path))
    trainer.finetune(ImageClassifier(3, backbone="tiny_resnet", pretrained=False), tiny_data)
    checkpoint = tmp_path / "checkpoints" / "step-00000006"
    first = (checkpoint / "manifest.json").read_text()
    real_replace, calls = os.replace, []

    def crash_on_the_second_rename(source, target):
        calls.append(Path(target).name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise OSError("killed")
        real_replace(source, target)

    trainer.run.saved_position = None
    monkeypatch.setattr(os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError, match="killed"):
        trainer.save_training_state(trainer.run)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls == [".step-00000006.replaced", "step-00000006"] and not checkpoint.exists()
    assert (tmp_path / "checkpoints" / ".step-00000006.replaced" / "manifest.json").read_text() == first  # kept
    trainer.save_training_state(trainer.run)  # restores the one aside, then replaces it whole
    verify(checkpoint)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]
