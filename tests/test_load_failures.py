"""--no-scan: no image is decoded before training; one that fails to load is replaced by the next readable
image in the list (the same one every time), named when met and counted over every worker at the end."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKBONE, tiny_trainer, write_image_folder

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.errors import DataError


@pytest.fixture()
def broken_folders(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4, size=16, seed=1)
    write_image_folder(tmp_path / "val", per_class=2, size=16, seed=2)
    broken = train / "green" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path, str(broken)


def test_an_unreadable_image_is_replaced_by_the_next_one_in_the_list(broken_folders):
    root, broken = broken_folders
    data = ImageClassificationData.from_folders(str(root / "train"), str(root / "val"), image_size=16,
                                                num_workers=0, augment=False, scan=False)
    dataset = data.train_dataset()
    at = dataset.paths.index(broken)
    assert dataset.paths[at + 1].endswith("green/green_0.png")
    image, label = dataset[at]
    assert torch.equal(image, dataset[at + 1][0]) and label == 1
    assert list(data.load_failures.read()) == [broken]
    strict = ImageClassificationData.from_folders(str(root / "train"), str(root / "val"), image_size=16,
                                                  num_workers=0, augment=False)
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        strict.train_dataset()[at]


def test_no_scan_trains_and_counts_what_its_workers_could_not_read(broken_folders, capfd):
    root, broken = broken_folders
    data = ImageClassificationData.from_folders(str(root / "train"), str(root / "val"), image_size=32,
                                                batch_size=4, num_workers=1, scan=False)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, BACKBONE, pretrained=False)
    history = tiny_trainer(max_epochs=1).finetune(task, data, "no_freeze")
    assert len(history) == 1 and len(data.train_paths) == 13  # nothing dropped before training
    out, err = capfd.readouterr()
    assert "images not scanned (--no-scan)" in out
    assert f"warning: 1 image(s) could not be read during training and were replaced" in out and broken in out
    assert f"cannot read image {broken}" in err  # named by the loader worker that met it


def test_the_no_scan_flag_reaches_the_data_config_and_the_data(broken_folders):
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.recipe import build_data

    assert train_config(build_parser().parse_args(["train"])).data.scan is None  # scan, unless packed
    root, _ = broken_folders
    config = train_config(build_parser().parse_args(["train", "--no-scan", "--train-folder", str(root / "train")]))
    assert config.data.scan is False
    data = build_data(config)  # no val folder: the held-out split is drawn without hashing the images
    assert data.scan is False and data.load_failures is not None and len(data.train_paths + data.val_paths) == 13
