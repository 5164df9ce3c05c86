"""Training determinism, metrics, checkpoints round-trips, and prediction on files, lists and folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_trainer
from safetensors.torch import save_file

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune.checkpoint import CheckpointError, read_metadata


def finetuned(data, tmp_path, seed=0, **settings):
    seed_everything(seed)  # the head (and here the whole random-init backbone) is initialised now
    task = ImageClassifier(data.num_classes, backbone="tiny_resnet", pretrained=False)
    trainer = tiny_trainer(max_epochs=2, seed=seed, output_dir=str(tmp_path), **settings)
    metrics = trainer.finetune(task, data, strategy=("freeze_unfreeze", 1))
    return trainer, task, metrics


def test_same_seed_gives_identical_weights(tiny_data, tmp_path):
    _, first, _ = finetuned(tiny_data, tmp_path / "a", seed=7)
    _, second, _ = finetuned(tiny_data, tmp_path / "b", seed=7)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    _, third, _ = finetuned(tiny_data, tmp_path / "c", seed=8)
    assert not torch.equal(first.head.layers[-1].weight, third.head.layers[-1].weight)


def test_metrics_jsonl_and_return_value(tiny_data, tmp_path):
    _, _, metrics = finetuned(tiny_data, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == metrics and [m["epoch"] for m in metrics] == [0, 1]
    for key in ("train_loss", "val_loss", "val_acc", "images_per_s", "lr", "val_images"):
        assert key in metrics[0]
    assert metrics[1]["val_images"] == 12 and len(metrics[1]["lr"]) == 2


def test_checkpoint_round_trip_predictions_and_metadata(tiny_data, tmp_path):
    trainer, task, metrics = finetuned(tiny_data, tmp_path)
    path = tmp_path / "model.safetensors"
    meta = read_metadata(path)
    assert meta["backbone"] == "tiny_resnet" and meta["labels"] == ["blue", "green", "red"]
    assert meta["image_size"] == 32 and meta["num_classes"] == 3 and len(meta["mean"]) == 3
    loaded = ImageClassifier.load_from_checkpoint(path)
    for (name, a), (_, b) in zip(task.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    paths = tiny_data.val_paths
    task.eval()
    assert loaded.predict(paths) == task.predict(paths)
    ours, theirs = loaded.predict_with_scores(paths), task.predict_with_scores(paths)  # channels_last vs not
    assert [label for label, _ in ours] == [label for label, _ in theirs]
    assert [score for _, score in ours] == pytest.approx([score for _, score in theirs], abs=1e-5)
    assert trainer.validate(loaded, tiny_data)["val_acc"] == pytest.approx(metrics[-1]["val_acc"])


def test_predict_file_list_and_folder(tiny_data, image_folders, tmp_path):
    _, task, _ = finetuned(tiny_data, tmp_path)
    one = tiny_data.val_paths[0]
    assert task.predict(one) in tiny_data.classes
    assert task.predict([one, one]) == [task.predict(one)] * 2
    by_path = task.predict(str(image_folders / "val"))
    assert sorted(by_path) == sorted(tiny_data.val_paths) and by_path[one] == task.predict(one)


def test_loading_into_another_architecture_names_the_keys(tiny_data, tmp_path):
    finetuned(tiny_data, tmp_path)
    state = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "model.safetensors"))
    other = ImageClassifier(3, backbone="resnet34", pretrained=False)
    with pytest.raises(CheckpointError, match=r"missing: \['backbone.layer1.2"):
        other.load_weights(state, "model.safetensors")


def test_plain_safetensors_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a model saved by dist_finetune"):
        ImageClassifier.load_from_checkpoint(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        ImageClassifier.load_from_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        ImageClassifier.load_from_checkpoint(tmp_path / "missing.safetensors")


def test_head_options_and_top5(tmp_path):
    from conftest import write_image_folder

    from dist_finetune import ImageClassificationData

    classes = tuple(f"c{i}" for i in range(6))
    root = write_image_folder(tmp_path / "train", classes=classes, per_class=3, size=24)
    data = ImageClassificationData.from_folders(str(root), val_split=0.34, image_size=32, batch_size=4, num_workers=0)
    task = ImageClassifier(6, "tiny_resnet", pretrained=False, head_hidden=16, head_dropout=0.1)
    metrics = tiny_trainer(max_epochs=1, output_dir=str(tmp_path / "out")).finetune(task, data, "freeze")
    assert "val_top5" in metrics[0] and metrics[0]["val_top5"] >= metrics[0]["val_acc"]
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "out" / "model.safetensors")
    assert loaded.head_hidden == 16 and loaded.predict(data.val_paths) == task.eval().predict(data.val_paths)
