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
    ours, theirs = loaded.predict_with_scores(paths), task.predict_with_scores(paths)
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


def test_loading_into_another_architecture_names_the_keys(tmp_path):
    """tiny_resnet with a hidden head layer into resnet34 with a plain head: resnet34's extra blocks are
    missing, the hidden layer's tensors unexpected, and the 7x7 stem (vs 3x3) has another shape."""
    path = tmp_path / "model.safetensors"
    ImageClassifier(3, backbone="tiny_resnet", pretrained=False, head_hidden=16).save_checkpoint(path)
    state = ImageClassifier.load_from_checkpoint(path).state_dict()
    other = ImageClassifier(3, backbone="resnet34", pretrained=False)
    with pytest.raises(CheckpointError) as refused:
        other.load_weights(state, "model.safetensors")
    message = str(refused.value)
    assert "model.safetensors does not match this model" in message
    assert "missing: ['backbone.layer1.2." in message
    assert "unexpected: ['head.layers.2.bias', 'head.layers.2.weight']" in message
    assert "; shape: [" in message and "'backbone.conv1.weight (8, 3, 3, 3) vs (64, 3, 7, 7)'" in message


def test_plain_safetensors_without_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    hint = r"not a model saved by dist_finetune .*pass it as weights=\.\.\. / --weights"
    with pytest.raises(CheckpointError, match=hint):
        ImageClassifier.load_from_checkpoint(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        ImageClassifier.load_from_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        ImageClassifier.load_from_checkpoint(tmp_path / "missing.safetensors")


def test_head_options_and_top5(tmp_path):
    """val_top5 (above 5 classes) equals a top-5 accuracy computed here from the model's own logits."""
    from conftest import write_image_folder

    from dist_finetune import ImageClassificationData

    classes = tuple(f"c{i}" for i in range(8))
    root = write_image_folder(tmp_path / "train", classes=classes, per_class=4, size=24)
    data = ImageClassificationData.from_folders(str(root), val_split=0.5, image_size=32, batch_size=4, num_workers=0)
    seed_everything(0)
    task = ImageClassifier(8, "tiny_resnet", pretrained=False, head_hidden=16, head_dropout=0.1)
    metrics = tiny_trainer(max_epochs=1, output_dir=str(tmp_path / "out")).finetune(task, data, "freeze")
    task.eval()
    with torch.no_grad():
        batches = [(task(images).float(), labels) for images, labels in
                   torch.utils.data.DataLoader(data.val_dataset(), batch_size=5)]
    logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    rank = (logits > logits.gather(1, labels[:, None])).sum(dim=1)  # how many classes score above the true one
    top1, top5 = (rank == 0).double().mean().item(), (rank < 5).double().mean().item()
    assert metrics[0]["val_images"] == len(labels) == 16
    assert metrics[0]["val_acc"] == pytest.approx(top1) and metrics[0]["val_top5"] == pytest.approx(top5)
    assert top1 < top5 < 1, "the data must tell top-5 apart from top-1 and from top-8"
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "out" / "model.safetensors")
    assert loaded.head_hidden == 16 and loaded.predict(data.val_paths) == task.eval().predict(data.val_paths)


@pytest.mark.parametrize("outputs", [2, 4])
def test_a_model_with_another_class_count_than_the_data_is_refused_before_anything_runs(tiny_data, tmp_path, outputs):
    """3 classes: 2 outputs failed in the loss (IndexError; a device assert on GPU), 4 trained every epoch
    and wrote model files that could not be loaded."""
    from dist_finetune.errors import ConfigError

    task = ImageClassifier(outputs, backbone="tiny_resnet", pretrained=False)
    trainer = tiny_trainer(max_epochs=1, output_dir=str(tmp_path / "run"))
    refused = (rf"the model has num_classes={outputs} outputs but the data has 3 classes \(blue, green, red\); "
               r"build it with ImageClassifier\(num_classes=data.num_classes, \.\.\.\)")
    for run in (lambda: trainer.finetune(task, tiny_data), lambda: trainer.validate(task, tiny_data),
                lambda: trainer.evaluate(task, tiny_data)):
        with pytest.raises(ConfigError, match=refused):
            run()
    assert not (tmp_path / "run").exists()


def test_a_model_is_scored_only_on_data_labelled_with_its_classes_in_its_order(tiny_data):
    """Same class count, other order: every metric would compare the wrong classes (validate, evaluate)."""
    from dist_finetune.errors import ConfigError

    task = ImageClassifier(3, backbone="tiny_resnet", pretrained=False)
    task.labels = ["red", "green", "blue"]  # as a loaded model knows them; the data has blue, green, red
    trainer = tiny_trainer()
    refused = (r"the model's classes are \['red', 'green', 'blue'\] but the data's are \['blue', 'green', 'red'\]"
               r".*dist-finetune evaluate --checkpoint FILE --data-folder DIR maps them by name")
    for run in (lambda: trainer.validate(task, tiny_data), lambda: trainer.evaluate(task, tiny_data)):
        with pytest.raises(ConfigError, match=refused):
            run()
    task.labels = ["blue", "green", "red"]
    assert set(trainer.validate(task, tiny_data)) >= {"val_loss", "val_acc"}
