"""Train/val splits (dist_finetune/splits.py): duplicates and leakage between the splits, the stratified val
split, the imbalance warning, class counts and the auto class weights."""

from __future__ import annotations

import re
import shutil

import datasets
import pytest
import torch
from conftest import BACKBONE, tiny_trainer, write_image_folder
from test_evaluation import NAMES
from test_sources import SETTINGS, image_dataset

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.checkpoint import read_metadata
from dist_finetune.errors import DataError
from dist_finetune.images import content_digests
from dist_finetune.splits import class_count_lines, stratified_split


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_identical_images_in_train_and_val_are_reported_and_dropped_with_dedupe(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4, size=16, seed=1)
    val = write_image_folder(tmp_path / "val", per_class=2, size=16, seed=2)
    leaked = [(train / "red" / "red_0.png", val / "red" / "copy.png"),
              (train / "blue" / "blue_1.png", val / "blue" / "copy.png")]
    for source, copy in leaked:
        shutil.copy(source, copy)
    shutil.copy(train / "green" / "green_0.png", train / "green" / "green_9.png")  # within train: not leakage
    data = ImageClassificationData.from_folders(str(train), str(val), **SETTINGS)
    data.check_images()
    summary = "\n".join(data.summary)
    assert "images per class (train / val), 13 / 8 in all:" in summary
    assert "warning: 2 image(s) in val are byte-identical to train images" in summary
    for source, copy in leaked:
        assert f"{source} = {copy}" in summary and str(copy) in data.val_paths
    assert "1 group(s) of byte-identical images within a split, kept" in summary
    deduped = ImageClassificationData.from_folders(str(train), str(val), dedupe=True, **SETTINGS)
    deduped.check_images()
    assert set(data.val_paths) - set(deduped.val_paths) == {str(copy) for _, copy in leaked}
    assert set(data.train_paths) - set(deduped.train_paths) == {str(train / "green" / "green_9.png")}
    assert "dropped from val (dedupe)" in "\n".join(deduped.summary)


def test_a_val_split_keeps_identical_images_on_one_side(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=8, size=16)
    for name in ("blue", "green", "red"):
        for i in range(3):  # three images of each class have two more copies each
            for copy in ("a", "b"):
                shutil.copy(root / name / f"{name}_{i}.png", root / name / f"{name}_{i}{copy}.png")
    for seed in range(6):
        data = ImageClassificationData.from_folders(str(root), val_split=0.25, seed=seed)
        digests = content_digests(data.train_paths + data.val_paths)
        assert not {digests[p] for p in data.train_paths} & {digests[p] for p in data.val_paths}
        assert sorted(set(data.val_labels)) == [0, 1, 2] and 9 <= len(data.val_paths) <= 18  # ~0.25 of 14 a class
    labels = [0] * 10 + [1] * 6
    assert stratified_split(labels, 0.25, 3, groups=[f"unique{i}" for i in range(16)]) == \
        stratified_split(labels, 0.25, 3)  # no duplicates: the plain split


def test_imbalance_is_warned_under_one_tenth():
    for counts, warned in (((20, 2, 5), False), ((21, 2, 5), True)):
        data = ImageClassificationData.from_datasets(image_dataset(counts), image_dataset(2, seed=1), **SETTINGS)
        data.check_images()
        warning = [line for line in data.summary if "imbalance" in line]
        assert bool(warning) == warned
    assert "green has 2 train images, under 1/10 of blue (21)" in warning[0]


def test_class_weights_auto_weight_the_loss_and_are_saved(tmp_path, capsys, monkeypatch):
    weights_used = []  # the weight argument of every cross-entropy the run computes
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *args, weight=None, **kwargs: (
        weights_used.append(None if weight is None else weight.tolist()), cross_entropy(*args, weight=weight,
                                                                                        **kwargs))[1])

    def run(class_weights, out=None):
        data = ImageClassificationData.from_datasets(image_dataset((12, 4, 8)), image_dataset(2, seed=1),
                                                     class_weights=class_weights, **SETTINGS)
        seed_everything(0)
        task = ImageClassifier(3, BACKBONE, pretrained=False)
        tiny_trainer(max_epochs=1, output_dir=out and str(out)).finetune(task, data, "no_freeze")
        return task, data

    weighted, data = run("auto", tmp_path / "weighted")
    # 12, 4 and 8 train images: N / (C * n_c) = 24 / 36, 24 / 12, 24 / 24 weight each training step's loss
    assert [w for w in weights_used if w is not None] == [pytest.approx([2 / 3, 2.0, 1.0])] * 6
    weights_used.clear()
    assert data.loss_weights() == pytest.approx([24 / 36, 24 / 12, 24 / 24])
    assert read_metadata(tmp_path / "weighted" / "model.safetensors")["class_weights"] == data.loss_weights()
    assert ImageClassifier.load_from_checkpoint(tmp_path / "weighted" / "last.safetensors").class_weights == \
        data.loss_weights()
    printed = capsys.readouterr().out
    assert "images per class (train / val), 24 / 6 in all:" in printed and re.search(r"blue +12 / 2\n", printed)
    plain, _ = run("none")
    assert plain.class_weights is None and plain.metadata()["class_weights"] is None
    assert weights_used and all(w is None for w in weights_used)
    assert not torch.equal(weighted.head.layers[-1].weight, plain.head.layers[-1].weight)


def test_a_file_listed_twice_is_kept_once_and_a_file_in_both_splits_is_leakage(tmp_path):
    """csv: the same path twice in train is one image (kept once, said once); the same path in train and
    val is leakage, found by path; --dedupe keeps exactly one copy of each image, the train one."""
    root = write_image_folder(tmp_path, classes=("a", "b"), per_class=5, size=16)
    shutil.copy(root / "b" / "b_0.png", root / "b" / "copy.png")  # other file, same bytes
    train = ["a/a_0.png", "a/a_0.png", "a/a_1.png", "a/a_2.png", "a/a_3.png", "b/b_0.png", "b/b_1.png", "b/b_2.png"]
    val = ["a/a_3.png", "a/a_4.png", "b/b_3.png", "b/b_4.png", "b/copy.png"]
    for name, rows in (("train.csv", train), ("val.csv", val)):
        (tmp_path / name).write_text("".join(f"{row},{row[0]}\n" for row in rows))
    csvs = (str(tmp_path / "train.csv"), str(root), str(tmp_path / "val.csv"))
    data = ImageClassificationData.from_csv(*csvs, **SETTINGS)
    data.check_images()
    summary = "\n".join(data.summary)
    assert "images per class (train / val), 7 / 5 in all:" in summary
    assert f"warning: train lists 1 file(s) more than once, kept once each: {root / 'a' / 'a_0.png'} (2 times)" \
        in summary
    assert (f"warning: 1 file(s) listed in both train and val (leakage: validation overstates accuracy); remove "
            f"them from one side (--dedupe drops them from val): {root / 'a' / 'a_3.png'}") in summary
    assert "1 image(s) in val are byte-identical to train images" in summary
    deduped = ImageClassificationData.from_csv(*csvs, dedupe=True, **SETTINGS)
    deduped.check_images()
    assert sorted(deduped.train_paths) == sorted({str(root / row) for row in train})  # 7: nothing lost
    assert sorted(deduped.val_paths) == sorted(str(root / row) for row in val[1:4])  # a_3 and the copy dropped
    (tmp_path / "train.csv").write_text("a/a_0.png,a\nb/b_0.png,b\na/a_0.png,b\n")
    with pytest.raises(DataError, match=r"train lists .*a_0.png twice, as a and as b: keep the row"):
        ImageClassificationData.from_csv(*csvs, **SETTINGS).check_images()


def test_auto_class_weights_are_counted_after_drops_and_weight_only_the_training_loss(tmp_path):
    """Train lists 13 / 5 / 8 images: a copy of a blue image (dedupe drops it) and an unreadable green
    one (skipped), so the counts are 12 / 4 / 8 and the weights N / (C n_c) = 24/36, 24/12, 24/24.
    The head is set to weight 0 and bias (0, 1, 2) and barely moves (lr 1e-12), so every image's loss
    is l_c = logsumexp(0, 1, 2) - b_c; with one batch of all 24 images the weighted mean is
    sum_c n_c w_c l_c / sum_c n_c w_c = the plain mean of l_c over classes, while val (6 / 2 / 4
    images) stays unweighted: (6 l_0 + 2 l_1 + 4 l_2) / 12."""
    import math

    train = image_dataset((12, 4, 8)).to_dict()
    train["image"] += [train["image"][0], {"bytes": b"\x89PNG\r\n\x1a\n cut short", "path": None}]
    train["label"] += ["blue", "green"]
    train = datasets.Dataset.from_dict(train, features=image_dataset(1).features)
    data = ImageClassificationData.from_datasets(train, image_dataset((6, 2, 4), seed=1), class_weights="auto",
                                                 dedupe=True, skip_bad_images=True, image_size=32, batch_size=24,
                                                 num_workers=0)
    seed_everything(0)
    task = ImageClassifier(3, BACKBONE, pretrained=False)
    with torch.no_grad():
        task.head.layers[-1].weight.zero_()
        task.head.layers[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    metrics = tiny_trainer(max_epochs=1, lr=1e-12, output_dir=str(tmp_path)).finetune(task, data, "freeze")
    assert task.class_weights == pytest.approx([24 / 36, 24 / 12, 24 / 24])
    assert read_metadata(tmp_path / "model.safetensors")["class_weights"] == pytest.approx([24 / 36, 2.0, 1.0])
    losses = [math.log(1 + math.e + math.e ** 2) - bias for bias in (0.0, 1.0, 2.0)]
    assert metrics[0]["train_images"] == 24
    assert metrics[0]["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert metrics[0]["val_loss"] == pytest.approx((6 * losses[0] + 2 * losses[1] + 4 * losses[2]) / 12, rel=1e-5)


def test_identical_images_with_different_labels_are_listed_with_their_labels(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=3, size=16, seed=1)
    val = write_image_folder(tmp_path / "val", per_class=2, size=16, seed=2)
    shutil.copy(train / "red" / "red_0.png", train / "blue" / "looks_red.png")  # within train, labelled blue
    shutil.copy(train / "green" / "green_1.png", val / "red" / "looks_green.png")  # across the split, labelled red
    data = ImageClassificationData.from_folders(str(train), str(val), **SETTINGS)
    data.check_images()
    conflicting = [line for line in data.summary if "carry different labels" in line]
    assert len(conflicting) == 1, data.summary
    assert conflicting[0].startswith("warning: 2 group(s) of identical images carry different labels")
    # in listing order: train before val, class folders sorted
    assert f"{train / 'blue' / 'looks_red.png'} (blue) = {train / 'red' / 'red_0.png'} (red)" in conflicting[0]
    assert f"{train / 'green' / 'green_1.png'} (green) = {val / 'red' / 'looks_green.png'} (red)" in conflicting[0]


def test_class_counts_above_a_few_dozen_classes_are_min_median_max_with_the_smallest_named():
    train = [label for label in range(60) for _ in range(10 + label)]
    val = [label for label in range(60) for _ in range(2)]
    assert class_count_lines(NAMES, train, val) == [
        f"images per class (train / val), {len(train)} / 120 in all:",
        "  train: 60 classes, min 10 / median 40 / max 69 images; smallest: c00 (10), c01 (11), c02 (12), c03 (13), "
        "c04 (14)",
        "  val: 60 classes, min 2 / median 2 / max 2 images; smallest: c00 (2), c01 (2), c02 (2), c03 (2), c04 (2)"]
    assert len(class_count_lines(NAMES[:3], [0, 1, 2], [0, 1, 2])) == 4  # a table below
