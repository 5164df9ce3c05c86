"""dist-finetune pack: a folder packed once trains exactly as the folder does, with no scan; what was left
out is listed in the manifest, and a source that changed since is reported."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import BACKBONE, tiny_trainer, write_image_folder

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.cli import main
from dist_finetune.config import apply_overrides
from dist_finetune.errors import DataError
from dist_finetune.packing import MANIFEST, packed_note

SETTINGS = dict(image_size=32, batch_size=4, num_workers=0)


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def one_epoch(data):
    seed_everything(0)
    task = ImageClassifier(data.num_classes, BACKBONE, pretrained=False)
    history = tiny_trainer(max_epochs=1).finetune(task, data, "no_freeze")
    return history, task.state_dict()


def test_training_from_the_packed_folder_is_training_from_the_folder(image_folders, tmp_path, cache_home, capsys):
    packed = tmp_path / "packed"
    main(["pack", "--train-folder", str(image_folders / "train"), "--val-folder", str(image_folders / "val"),
          "--output", str(packed)])
    assert "packed train 24, validation 12 images of 3 classes" in capsys.readouterr().out
    from_folder = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                       **SETTINGS)
    from_packed = ImageClassificationData.from_hub(str(packed), **SETTINGS)
    assert not from_packed.scan and from_packed.classes == from_folder.classes
    assert from_packed.train_labels == from_folder.train_labels and from_packed.val_labels == from_folder.val_labels
    folder_history, folder_weights = one_epoch(from_folder)
    capsys.readouterr()
    packed_history, packed_weights = one_epoch(from_packed)
    assert f"packed dataset {packed} (from {image_folders / 'train'}): scanned when packed, 0 file(s) left out" \
        in capsys.readouterr().out
    for key in ("train_loss", "val_loss", "val_acc"):
        assert packed_history[0][key] == folder_history[0][key]
    assert all(torch.equal(packed_weights[name], folder_weights[name]) for name in folder_weights)


def test_the_manifest_lists_what_was_left_out_and_a_changed_source_is_reported(tmp_path, cache_home):
    train = write_image_folder(tmp_path / "train", per_class=3, size=16)
    broken = train / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(train / "blue" / "blue_0.png", train / "green" / "copy.png")
    arguments = ["pack", "--train-folder", str(train), "--output", str(tmp_path / "packed")]
    with pytest.raises(SystemExit):
        main(arguments)  # an unreadable file stops packing unless it may be left out
    assert not (tmp_path / "packed").exists()
    main([*arguments, "--skip-bad-images", "--dedupe"])
    manifest = json.loads((tmp_path / "packed" / MANIFEST).read_text())
    assert manifest["rows"] == {"train": 9}
    assert manifest["dropped"] == [
        {"split": "train", "item": str(train / "green" / "copy.png"), "reason": f"byte-identical to {train}/blue/blue_0.png"},
        {"split": "train", "item": str(broken), "reason": manifest["dropped"][1]["reason"]}]
    assert manifest["dropped"][1]["reason"].startswith("unreadable: ")
    assert "scanned when packed, 2 file(s) left out" in packed_note(str(tmp_path / "packed"))
    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.recipe import build_data

    config = train_config(build_parser().parse_args(["train", "--dataset", str(tmp_path / "packed")]))
    assert build_data(config).scan is False  # the command line trains from a packed dataset without a scan
    config = apply_overrides(config, {"data.scan": True})
    assert build_data(config).scan is True  # unless asked to
    (train / "red" / "new.png").write_bytes(broken.read_bytes())
    note = packed_note(str(tmp_path / "packed"))
    assert note.startswith(f"warning: packed dataset {tmp_path / 'packed'} was made from {train}, which has changed")
    assert f"{train}/red/" in note


class Interrupted(Exception):
    pass


class StopAsEpoch1Starts(Callback):
    """Epoch 0's checkpoint is written; epoch 1 is left to the resume."""

    def on_epoch_start(self, trainer, run) -> None:
        if run.position.epoch == 1:
            raise Interrupted()


def test_a_run_from_a_packed_dataset_resumes_bit_exactly(image_folders, tmp_path, cache_home):
    packed = tmp_path / "packed"
    main(["pack", "--train-folder", str(image_folders / "train"), "--val-folder", str(image_folders / "val"),
          "--output", str(packed)])

    def train(out, callbacks=(), resume=None):
        data = ImageClassificationData.from_hub(str(packed), **SETTINGS)
        seed_everything(0)
        task = ImageClassifier(data.num_classes, BACKBONE, pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(out), callbacks=list(callbacks))
        trainer.finetune(task, data, "no_freeze", resume=resume)
        assert (trainer.run.resumed_from is not None) == (resume is not None)
        return task.state_dict()

    whole = train(tmp_path / "whole")
    with pytest.raises(Interrupted):
        train(tmp_path / "resumed", [StopAsEpoch1Starts()])
    resumed = train(tmp_path / "resumed", resume="latest")
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
