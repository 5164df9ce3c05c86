"""Image folders: discovery, class order, splits, any image mode, and errors that name the path; the balanced
sampler, and repeated images' augmentation."""

from __future__ import annotations

import csv
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import BACKBONE, Killed, kill_at, tiny_trainer, write_image_folder
from PIL import Image
from safetensors.torch import load_file
from test_sources import SETTINGS, image_dataset, scan_cache  # noqa: F401  (scan_cache: the fixture)

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.data import BalancedSampler, REPEAT_STRIDE, eval_resize_size, stratified_split
from dist_finetune.errors import DataError
from dist_finetune.images import load_rgb


def test_from_folders_reads_classes_in_the_same_order(image_folders, tiny_data):
    assert tiny_data.classes == ["blue", "green", "red"]
    assert len(tiny_data.train_paths) == 24 and len(tiny_data.val_paths) == 12
    for path, label in zip(tiny_data.val_paths, tiny_data.val_labels):
        assert f"/{tiny_data.classes[label]}/" in path
    image, label = tiny_data.train_dataset()[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and isinstance(label, int)


def test_val_split_is_stratified_and_seeded(image_folders):
    a = ImageClassificationData.from_folders(str(image_folders / "train"), val_split=0.25, seed=3)
    b = ImageClassificationData.from_folders(str(image_folders / "train"), val_split=0.25, seed=3)
    assert a.val_paths == b.val_paths
    assert sorted(a.val_labels) == [0, 0, 1, 1, 2, 2]
    assert not set(a.val_paths) & set(a.train_paths)
    train, val = stratified_split([0] * 10 + [1] * 3, 0.2, seed=0)
    assert len(val) == 3 and len(train) == 10


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    elif mode == "I":
        image = rgb.convert("L").convert("I")
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16", "I") else "x.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    if mode == "I;16":
        assert np.asarray(loaded).max() > 200  # 16-bit range scaled into 8 bits, not clipped to white/black


def test_mixed_modes_train_end_to_end(tmp_path):
    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier

    root = write_image_folder(tmp_path / "train", per_class=4, size=24)
    for index, path in enumerate(sorted(root.rglob("*.png"))):
        mode = ["L", "RGBA", "P", "LA"][index % 4]
        Image.open(path).convert(mode).save(path)
    data = ImageClassificationData.from_folders(str(root), val_split=0.25, image_size=32, batch_size=3, num_workers=0)
    metrics = tiny_trainer(max_epochs=1).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data, "no_freeze")
    assert metrics[0]["val_images"] == 3


def test_png_named_jpg_and_exif_rotation(tmp_path):
    path = tmp_path / "lies.jpg"
    Image.new("RGB", (10, 20), "red").save(path, format="PNG")
    assert load_rgb(path).size == (10, 20)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), "blue").save(rotated, exif=exif)
    assert load_rgb(rotated).size == (20, 40)


def test_large_jpeg_decodes_at_reduced_size_but_never_below_the_target(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(path)
    reduced = load_rgb(path, min_side=64)
    assert min(reduced.size) >= 64 and reduced.size[0] <= 500
    assert load_rgb(path).size == (2000, 1500)


def test_eval_datasets_draft_decode_no_smaller_than_the_eval_resize(tmp_path):
    """eval_transform resizes to image_size/0.875 first; a draft below that would be upsampled."""
    path = tmp_path / "big.jpg"  # 1/8 scale: 45x34, between image_size 32 and the resize target 37
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (272, 360, 3), dtype=np.uint8)).save(path)
    assert eval_resize_size(32) == 37 and min(load_rgb(path, min_side=32).size) == 34
    data = ImageClassificationData([str(path)], [0], [str(path)], [0], ["a"], image_size=32, augment=False)
    for dataset in (data.val_dataset(), data.train_dataset()):
        assert min(load_rgb(path, dataset.min_side).size) >= 37
        assert dataset[0][0].shape == (3, 32, 32)


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        ImageClassificationData.from_folders(str(tmp_path / "nope"))


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        ImageClassificationData.from_folders(str(tmp_path / "flat"))


def test_empty_class_folder_names_the_class_folder(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=3, size=16)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        ImageClassificationData.from_folders(str(root))


def test_single_class_is_rejected(tmp_path):
    root = write_image_folder(tmp_path / "train", classes=("only",), per_class=3, size=16)
    with pytest.raises(DataError, match="one class"):
        ImageClassificationData.from_folders(str(root))


def test_val_classes_must_match_train(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2, size=16)
    val = write_image_folder(tmp_path / "val", classes=("blue", "green", "violet"), per_class=2, size=16)
    with pytest.raises(DataError, match=r"missing in val: \['red'\], extra in val: \['violet'\]"):
        ImageClassificationData.from_folders(str(train), str(val))


def test_unreadable_image_names_the_file(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=2, size=16)
    broken = root / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = ImageClassificationData.from_folders(str(root), val_split=0.5, image_size=16, num_workers=0)
    dataset = data.train_dataset() if str(broken) in data.train_paths else data.val_dataset()
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        dataset[dataset.paths.index(str(broken))]


def test_file_names_that_look_like_split_names_are_all_kept(tmp_path):
    """imagefolder guesses splits from names like train_0.jpg / test_1.jpg; every file must still count."""
    for name in ("cat", "dog"):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for stem in ("train_0", "img_1", "test_2", "val_3"):
            Image.new("RGB", (8, 8), name == "cat" and "red" or "blue").save(folder / f"{stem}.jpg")
    data = ImageClassificationData.from_folders(str(tmp_path / "train"), val_split=0.25)
    assert len(data.train_paths) + len(data.val_paths) == 8 and data.classes == ["cat", "dog"]
    for path, label in zip(data.train_paths + data.val_paths, data.train_labels + data.val_labels):
        assert f"/{data.classes[label]}/" in path


# every character a file system allows in a name is read as itself: never a glob pattern, a URL or an option
ODD_NAMES = ("x[1].png", "x1.png", "y*.png", "y.png", "why?.png", "whyz.png", "sp ace.png", " lead.png",
             "tail .png", "ünï códe.png", "#1%20.png", "-dash.png", "hf:x.png", "a::b.png", "s3:x.png")


def write_odd_names(folder, seed: int) -> list[str]:
    """One distinct 8 px image under each of ODD_NAMES in ``folder``; their absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in ODD_NAMES:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return [str(folder / name) for name in ODD_NAMES]


def test_file_and_class_names_with_pattern_characters_are_read_as_themselves(tmp_path):
    """x[1].png next to x1.png: both read, each once (the imagefolder builder read the list as glob patterns)."""
    listed = []
    for split in ("train", "val"):
        for seed, name in enumerate(("a[1]", "a1", "b*")):
            listed += write_odd_names(tmp_path / split / name, seed + (10 if split == "val" else 0))
    data = ImageClassificationData.from_folders(str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0)
    assert data.classes == ["a1", "a[1]", "b*"]
    assert sorted(data.train_paths + data.val_paths) == sorted(listed)  # every file once, none twice
    for path, label in zip(data.train_paths + data.val_paths, data.train_labels + data.val_labels):
        assert path.split("/")[-2] == data.classes[label]
    top = write_odd_names(tmp_path, seed=20)  # csv: the same names, also as a whole cell (" lead.png")
    with open(tmp_path / "all.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([*((f"train/{name}/{file}", name) for name in ("a1", "a[1]")
                                        for file in ODD_NAMES), *((file, "top") for file in ODD_NAMES)])
    data = ImageClassificationData.from_csv(str(tmp_path / "all.csv"), val_split=0.5)
    assert sorted(data.train_paths + data.val_paths) == sorted([p for p in listed if "/train/a" in p] + top)


def test_images_in_subfolders_count_for_their_class_but_hidden_folders_are_left_out(tmp_path):
    """``train/red/more/x.png`` is a red image; ``train/red/.ipynb_checkpoints/x-checkpoint.png`` is a
    tool's copy and never training data."""
    write_image_folder(tmp_path / "train", per_class=3, seed=1)
    write_image_folder(tmp_path / "val", per_class=2, seed=2)
    write_image_folder(tmp_path / "nested", classes=("more",), per_class=2, seed=3)
    (tmp_path / "nested" / "more").rename(tmp_path / "train" / "red" / "more")
    write_image_folder(tmp_path / "train" / "red", classes=(".ipynb_checkpoints",), per_class=2, seed=4)
    data = ImageClassificationData.from_folders(str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0)
    assert len(data.train_paths) == 3 * 3 + 2
    red = [p for p, y in zip(data.train_paths, data.train_labels) if data.classes[y] == "red"]
    assert sorted(p.split("/red/", 1)[1] for p in red) == ["more/more_0.png", "more/more_1.png",
                                                          "red_0.png", "red_1.png", "red_2.png"]


def test_train_crops_and_flips_at_random_and_eval_resizes_to_size_over_0_875_then_center_crops(tmp_path):
    """A 80x64 PNG, dark left half and bright right half (red), rows graded top to bottom (green).
    Eval (and training with augment=False): short side to 28 / 0.875 = 32, then the central 28x28,
    as torchvision computes them here. Training: over 24 epochs some crops are flipped (bright side on
    the left), some are not, and crops differ in scale and place (not just the central crop or its mirror)."""
    from torchvision.transforms.v2 import functional

    pixels = np.zeros((64, 80, 3), dtype=np.uint8)
    pixels[:, 40:, 0] = 255
    pixels[:, :, 1] = (np.arange(64) * 4)[:, None]
    Image.fromarray(pixels).save(tmp_path / "a.png")
    source = torch.from_numpy(pixels).permute(2, 0, 1)
    expected = functional.center_crop(functional.resize(source, 32, antialias=True), [28, 28])
    path = str(tmp_path / "a.png")
    plain = ImageClassificationData([path], [0], [path], [0], ["a"], image_size=28, augment=False)
    assert torch.equal(plain.val_dataset()[0][0], expected)
    assert torch.equal(plain.train_dataset()[0][0], expected)
    augmented = ImageClassificationData([path], [0], [path], [0], ["a"], image_size=28).train_dataset(seed=0)
    crops = [augmented[epoch][0] for epoch in range(24)]  # one image: item `epoch` is its draw in that epoch
    assert all(crop.shape == (3, 28, 28) for crop in crops)
    bright_right = [crop[0, :, -1].float().mean() > crop[0, :, 0].float().mean() for crop in crops]
    bright_left = [crop[0, :, 0].float().mean() > crop[0, :, -1].float().mean() for crop in crops]
    assert any(bright_right) and any(bright_left), "horizontal flips, about half the time"
    mirror = functional.horizontal_flip(expected)
    others = [crop for crop in crops if not torch.equal(crop, expected) and not torch.equal(crop, mirror)]
    assert len(others) >= 20, "random resized crops, not one fixed crop"
    green_ranges = {(int(crop[1].min()), int(crop[1].max())) for crop in crops}
    assert len(green_ranges) >= 12, "crops come from different heights and scales"


def test_augmented_training_decodes_at_twice_the_crop(tmp_path, monkeypatch):
    """RandomResizedCrop can zoom in, so training decodes a JPEG to at least 2 x image_size: a 400x300 file at
    image_size 32 is drafted at 1/4 (100x75), not at 1/8 (50x37, below 64)."""
    from dist_finetune import data as data_module

    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    decoded = []
    monkeypatch.setattr(data_module, "load_rgb", lambda source, min_side=None: decoded.append(
        load_rgb(source, min_side).size) or load_rgb(source, min_side))
    data = ImageClassificationData([str(path)], [0], [str(path)], [0], ["a"], image_size=32, augment=True)
    assert data.train_dataset()[0][0].shape == (3, 32, 32)
    assert decoded == [(100, 75)]


def test_loader_workers_default_and_val_workers_are_not_persistent(tiny_data, monkeypatch):
    """Per process: cores / local processes - 1, at most 8; train workers persist, val workers start per validation."""
    from types import SimpleNamespace

    from dist_finetune import Trainer

    data = ImageClassificationData(tiny_data.train_paths, tiny_data.train_labels, tiny_data.val_paths,
                                   tiny_data.val_labels, tiny_data.classes, image_size=32, batch_size=4)
    one_process = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    train, val = Trainer(max_epochs=1)._loaders(data, one_process)
    assert (train.num_workers, val.num_workers) == (3, 3)
    assert (train.persistent_workers, val.persistent_workers) == (True, False)
    assert not train.pin_memory and not val.pin_memory  # pinned memory on GPU only
    on_gpu = SimpleNamespace(num_processes=1, device=torch.device("cuda"))  # a device object; nothing runs on it
    assert all(loader.pin_memory for loader in Trainer(max_epochs=1)._loaders(data, on_gpu))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert Trainer(max_epochs=1)._loaders(data, one_process)[0].num_workers == 8


@pytest.mark.usefixtures("scan_cache")  # XDG_CACHE_HOME in tmp_path, as in test_splits.py
def test_balanced_sampler_draws_classes_equally_from_seed_and_epoch_only():
    labels = [0] * 90 + [1] * 8 + [2] * 2
    sampler = BalancedSampler(labels, seed=5)
    drawn = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert len(keys) == 100 and len(set(keys)) == 100  # repeats get keys of their own
        assert all(key // 100 % REPEAT_STRIDE == epoch for key in keys)  # EpochSampler's key format
        drawn.update(labels[key % 100] for key in keys)
    assert all(600 < drawn[c] < 730 for c in range(3)), drawn  # 2000 draws, ~667 per class
    again = BalancedSampler(labels, seed=5)
    again.set_epoch(19)
    assert list(again) == keys
    again.set_epoch(18)
    assert list(again) != keys


@pytest.mark.usefixtures("scan_cache")  # XDG_CACHE_HOME in tmp_path, as in test_splits.py
def test_balanced_sampler_on_a_dataset_resumes_bit_exactly(tmp_path, capsys):
    saved = tmp_path / "saved"
    image_dataset((10, 6, 4)).save_to_disk(saved)  # a memory-mapped dataset source, a val_split of it

    def finetune(out, callbacks=(), resume=None):
        data = ImageClassificationData.from_hub(str(saved), val_split=0.2, balanced_sampler=True,
                                                class_weights="auto", **SETTINGS)
        seed_everything(0)
        task = ImageClassifier(3, BACKBONE, pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(out), save_every_n_steps=5, callbacks=list(callbacks))
        trainer.finetune(task, data, "no_freeze", resume=resume)
        return load_file(out / "last.safetensors")

    uninterrupted = finetune(tmp_path / "a")
    with pytest.raises(Killed):
        finetune(tmp_path / "b", [kill_at(6)])  # epoch 1 (4 steps per epoch), batch 2
    resumed = finetune(tmp_path / "b", resume="latest")
    assert "at epoch 1, batch 1, step 5" in capsys.readouterr().out
    different = [name for name in uninterrupted if not torch.equal(uninterrupted[name], resumed[name])]
    assert uninterrupted.keys() == resumed.keys() and not different


@pytest.mark.usefixtures("scan_cache")  # XDG_CACHE_HOME in tmp_path, as in test_splits.py
def test_a_repeated_image_gets_its_own_augmentation_each_time():
    """One green image among seven blue: the balanced sampler draws it about 4 times an epoch; each draw is
    another crop/flip of it."""
    data = ImageClassificationData.from_datasets(image_dataset((7, 1)), image_dataset((2, 2), seed=1),
                                                 balanced_sampler=True, **SETTINGS)
    dataset = data.train_dataset(seed=0)
    red = data.train_labels.index(1)
    sampler = BalancedSampler(data.train_labels, seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        repeats = [key for key in sampler if key % len(data.train_labels) == red]
        assert len(repeats) >= 2, repeats
        images = [dataset[key][0] for key in repeats]
        assert all(label == 1 for _, label in (dataset[key] for key in repeats))
        assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
