"""Per-image augmentation: the train transform's policies, seeded per sample, and test-time augmentation in
validation, evaluate and predict (two processes: integration/test_prediction_ranks.py runs predict with it)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BACKBONE
from torch import nn

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.augment import tta_logits
from dist_finetune.cli import main


@pytest.mark.parametrize("policy", ["trivial", "randaugment"])
def test_a_stronger_policy_changes_the_pixels_and_stays_seeded_per_sample(image_folders, policy):
    """Same seed, same (epoch, index): a policy's crop is the same on every access; over 8 epochs of one image
    some crops differ from the basic policy's (which draws the same crop and flip first)."""
    settings = dict(image_size=32, batch_size=4, num_workers=0)
    folders = str(image_folders / "train"), str(image_folders / "val")
    basic = ImageClassificationData.from_folders(*folders, **settings).train_dataset(seed=0)
    stronger = ImageClassificationData.from_folders(*folders, augment_policy=policy, **settings).train_dataset(seed=0)
    keys = [epoch * len(stronger) for epoch in range(8)]  # image 0 in epochs 0..7
    draws = [stronger[key][0] for key in keys]
    assert all(torch.equal(draw, stronger[key][0]) for draw, key in zip(draws, keys))
    assert any(not torch.equal(draw, basic[key][0]) for draw, key in zip(draws, keys))


class Columns(nn.Module):
    """Logits = a fixed weighting of the image's column means: mirroring the image changes them."""

    num_classes = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        columns = images.float().mean(dim=(1, 2))  # [N, W]
        weights = torch.linspace(-1, 1, columns.shape[1])
        return torch.stack([columns @ weights, -(columns @ weights), columns.mean(dim=1)], dim=1)


def test_flip_tta_is_the_mean_of_both_passes_probabilities():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = Columns()
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    assert not torch.allclose(model(images).softmax(1), expected)  # the mirror image scores otherwise
    assert torch.allclose(tta_logits(model, images, "flip").softmax(1), expected, atol=1e-6)
    assert torch.equal(tta_logits(model, images, "none"), model(images))


def test_a_flip_symmetric_model_scores_the_same_with_and_without_tta():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    channel_means = lambda batch: batch.mean(dim=(2, 3)) * 10  # noqa: E731  (mirroring changes no mean)
    plain, flipped = tta_logits(channel_means, images, "none"), tta_logits(channel_means, images, "flip")
    assert torch.allclose(plain.softmax(1), flipped.softmax(1), atol=1e-6)


@pytest.fixture(scope="module")
def model_and_data(image_folders):
    """A random-init tiny_resnet for the folder's classes, and its data."""
    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    seed_everything(0)
    task = ImageClassifier(3, BACKBONE, pretrained=False, labels=data.classes, image_size=32)
    return task, data


def test_tta_in_validation_evaluate_and_predict(model_and_data, image_folders, tmp_path):
    """Trainer(tta="flip").validate / evaluate / predict and `evaluate --tta flip` score each val image by the
    mean of its and its mirror image's probabilities, computed here by hand from the two passes."""
    task, data = model_and_data
    images = torch.stack([data.val_dataset()[i][0] for i in range(len(data.val_paths))])
    labels = torch.tensor(data.val_labels)
    with torch.no_grad():
        task.eval()
        mean = (task(images).softmax(1) + task(images.flip(-1)).softmax(1)) / 2
    expected_loss = -mean[torch.arange(len(labels)), labels].log().mean().item()
    trainer = Trainer(tta="flip", progress_bar=False)
    assert trainer.validate(task, data)["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    report = trainer.evaluate(task, data)
    assert report["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert report["accuracy"] == pytest.approx((mean.argmax(1) == labels).float().mean().item())
    scores = task.predict_with_scores(data.val_paths, batch_size=4, num_workers=0, tta="flip")
    assert [p for _, p in scores] == pytest.approx(mean.max(1).values.tolist(), rel=1e-5)
    assert trainer.predict(task, data.val_paths) == [data.classes[c] for c in mean.argmax(1).tolist()]
    task.save_checkpoint(tmp_path / "model.safetensors")
    main(["evaluate", "--checkpoint", str(tmp_path / "model.safetensors"), "--data-folder",
          str(image_folders / "val"), "--output-dir", str(tmp_path / "eval"), "--tta", "flip", "--num-workers", "0"])
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["loss"] == pytest.approx(expected_loss, rel=1e-5) and written["model"]["tta"] == "flip"


def test_a_resume_must_keep_the_policy():
    """The policy is part of the data signature a checkpoint records (the default leaves it as before: None)."""
    assert ImageClassificationData([], [], [], [], ["a"]).signature() is None
    assert ImageClassificationData([], [], [], [], ["a"], augment_policy="trivial").signature() == {
        "dedupe": False, "class_weights": "none", "balanced_sampler": False, "augment_policy": "trivial"}
