"""MixUp/CutMix of training batches: the mixed pixels and targets for a fixed lambda, the per-(batch, rank) seeds,
the soft-target loss, a bit-exact resume with mixing and TrivialAugment on, and the settings refused before
anything is written."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKBONE, Killed, kill_at, tiny_trainer, write_image_folder
from safetensors.torch import load_file

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.cli import main
from dist_finetune.errors import ConfigError
from dist_finetune.mixing import BatchMixing, training_loss


def distinct_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 uint8 16x16 images, image i filled with 40 * (i + 1) (neighbours differ in every pixel), labels 0 1 2 1."""
    images = torch.stack([torch.full((3, 16, 16), 40 * (i + 1), dtype=torch.uint8) for i in range(4)])
    return images, torch.tensor([0, 1, 2, 1])


@pytest.fixture
def fixed_lambda(monkeypatch):
    """Every Beta draw returns 0.75 (torchvision draws MixUp's and CutMix's lambda from torch's Beta)."""
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self, shape=(): torch.tensor([0.75]))


def test_mixup_blends_each_image_with_the_previous_one(fixed_lambda):
    images, labels = distinct_batch()
    mixed, targets = BatchMixing(0.2, 0.0, 3, seed=0, rank=0)(images, labels, epoch=0, batch=0)
    pixels = images.float() / 255
    for i in range(4):
        expected = 0.75 * pixels[i] + 0.25 * pixels[i - 1]  # image -1 is the last: the batch is rolled by one
        assert torch.allclose(mixed[i], expected, atol=1e-6), i
    assert torch.allclose(targets, torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.75, 0.0], [0.0, 0.25, 0.75],
                                                 [0.0, 0.75, 0.25]]))
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_cutmix_pastes_a_box_of_the_previous_image_and_labels_by_area(fixed_lambda):
    """lambda 0.75: a box of half the side (8x8 of 16x16, less where it is cut at the border) comes from the
    previous image; the targets give the pasted label the box's share of the area."""
    images, labels = distinct_batch()
    for batch in range(6):  # boxes at several places, some cut at the border
        mixed, targets = BatchMixing(0.0, 1.0, 3, seed=0, rank=0)(images, labels, epoch=0, batch=batch)
        pixels = images.float() / 255
        pasted = mixed[0, 0] == pixels[-1, 0, 0, 0]
        rows, cols = pasted.any(dim=1).nonzero().flatten(), pasted.any(dim=0).nonzero().flatten()
        y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert (y2 - y1 <= 8 and x2 - x1 <= 8) and (y2 - y1 == 8 or y1 == 0 or y2 == 16) \
            and (x2 - x1 == 8 or x1 == 0 or x2 == 16)
        area = (y2 - y1) * (x2 - x1) / 256
        for i in range(4):
            expected = pixels[i].clone()
            expected[:, y1:y2, x1:x2] = pixels[i - 1][:, y1:y2, x1:x2]
            assert torch.equal(mixed[i], expected), (batch, i)
        assert torch.allclose(targets[0], torch.tensor([1 - area, area, 0.0]))
        assert torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_the_mixing_of_a_batch_is_seeded_by_batch_and_rank_and_leaves_the_global_rng_alone():
    images, labels = distinct_batch()
    mixing = BatchMixing(0.2, 1.0, 3, seed=7, rank=0)
    state = torch.get_rng_state()
    first, again = mixing(images, labels, 1, 2), mixing(images, labels, 1, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other_rank = BatchMixing(0.2, 1.0, 3, seed=7, rank=1)(images, labels, 1, 2)
    other_batch = mixing(images, labels, 1, 3)
    assert not torch.equal(first[1], other_rank[1]) and not torch.equal(first[1], other_batch[1])


def test_the_soft_target_loss():
    """Logits (0, ln 3) give p = (1/4, 3/4). Target (1/2, 1/2) with class weights (1, 3): the weighted sum
    -(1/2 ln 1/4 + 3/2 ln 3/4) over the target's weight 2. A one-hot target gives what its label gives, with
    class weights and label smoothing."""
    logits, weights = torch.tensor([[0.0, math.log(3)]]), torch.tensor([1.0, 3.0])
    expected = (0.5 * math.log(4) + 1.5 * math.log(4 / 3)) / 2
    assert training_loss(logits, torch.tensor([[0.5, 0.5]]), weights, 0.0).item() == pytest.approx(expected)
    assert training_loss(logits, torch.tensor([[0.5, 0.5]]), None, 0.0).item() == pytest.approx(
        (math.log(4) + math.log(4 / 3)) / 2)
    batch, labels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1])
    class_weights = torch.tensor([0.5, 1.0, 2.0])
    one_hot = F.one_hot(labels, 3).float()
    for weight in (None, class_weights):
        for smoothing in (0.0, 0.1):
            hard = F.cross_entropy(batch, labels, weight=weight, label_smoothing=smoothing)
            assert training_loss(batch, one_hot, weight, smoothing).item() == pytest.approx(hard.item(), rel=1e-6)


def test_resume_with_mixup_cutmix_and_trivial_augment_is_bit_exact(image_folders, tmp_path, capsys, monkeypatch):
    """MixUp + CutMix on TrivialAugment crops: killed mid-epoch 1 and resumed, the weights end bit-identical to
    the uninterrupted run's; every batch was mixed."""
    mixed = []
    mix = BatchMixing.__call__
    monkeypatch.setattr(BatchMixing, "__call__", lambda self, *args: mixed.append(args[2:]) or mix(self, *args))

    def finetune(out, callbacks=(), resume=None):
        data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                    image_size=32, batch_size=4, num_workers=0,
                                                    augment_policy="trivial")
        seed_everything(0)
        task = ImageClassifier(3, BACKBONE, pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(out), save_every_n_steps=2, callbacks=list(callbacks),
                               mixup=0.2, cutmix=1.0)
        trainer.finetune(task, data, ("freeze_unfreeze", 1), resume=resume)
        return load_file(out / "last.safetensors")

    uninterrupted = finetune(tmp_path / "a")
    assert mixed == [(epoch, batch) for epoch in (0, 1) for batch in range(6)]  # (epoch, batch) of each call
    with pytest.raises(Killed):
        finetune(tmp_path / "b", [kill_at(9)])  # epoch 1 (6 steps per epoch), batch 3
    resumed = finetune(tmp_path / "b", resume="latest")
    assert "at epoch 1, batch 2, step 8" in capsys.readouterr().out
    assert uninterrupted.keys() == resumed.keys()
    assert [name for name in uninterrupted if not torch.equal(uninterrupted[name], resumed[name])] == []


def test_bad_mixing_and_augment_settings_stop_before_anything_is_written(tmp_path, capsys):
    """Data of one class (nothing to mix: refused as for any training), a negative alpha, an unknown augment
    name: one clear error before training, exit 2, no output dir."""
    folder = write_image_folder(tmp_path / "one", classes=("blue",), per_class=4, size=32)
    out = tmp_path / "out"
    train = ["train", "--train-folder", str(folder), "--output-dir", str(out)]
    for extra, message in ((["--mixup", "0.2"], "has one class (blue): classification needs at least 2"),
                           (["--cutmix", "-1"], "cutmix (--cutmix) is the Beta distribution's alpha: 0 (off) or "
                                                "positive, got -1.0"),
                           (["--augment", "autoaugment"], "argument --augment: invalid choice: 'autoaugment'")):
        with pytest.raises(SystemExit) as stopped:
            main([*train, *extra])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(ConfigError, match=r"augment_policy \(--augment\) must be one of \('basic', 'trivial', "):
        ImageClassificationData([], [], [], [], ["a"], augment_policy="autoaugment")
    with pytest.raises(ConfigError, match="needs augment on: drop --no-augment"):
        ImageClassificationData([], [], [], [], ["a"], augment=False, augment_policy="trivial")
    with pytest.raises(ConfigError, match="mixup .* 0 .off. or positive, got -0.5"):
        tiny_trainer(mixup=-0.5)
