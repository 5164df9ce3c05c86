"""Data beyond folders: `datasets` datasets (in memory, save_to_disk, parquet folders) and csv files,
each built here (no downloads), trained on end to end, with errors that name the row or line."""

from __future__ import annotations

import io
import json
import pickle
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import BACKBONE, Killed, kill_at, tiny_trainer, write_image_folder
from PIL import Image

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.checkpoint import read_metadata
from dist_finetune.cli import main
from dist_finetune.config import ConfigError, config_from_dict
from dist_finetune.errors import DataError

NAMES = ("blue", "green", "red")
SETTINGS = dict(image_size=32, batch_size=4, num_workers=0)


def encoded(label: int, seed: int, mode: str = "RGB", size: int = 40) -> bytes:
    """PNG bytes of noise with a class-coloured square (as conftest's folders), in any PIL mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    pixels[y:y + size // 2, x:x + size // 2, label % 3] = 230
    handle = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(handle, "PNG")
    return handle.getvalue()


def image_dataset(per_class, seed: int = 0, class_label: bool = False, modes=("RGB",),
                  label_column: str = "label", image_column: str = "image") -> datasets.Dataset:
    """``per_class`` images of each class (an int, or one count per class) as a `datasets.Image` column."""
    counts = [per_class] * len(NAMES) if isinstance(per_class, int) else list(per_class)
    labels = [label for label, count in enumerate(counts) for _ in range(count)]
    images = [{"bytes": encoded(label, seed * 1000 + i, modes[i % len(modes)]), "path": None}
              for i, label in enumerate(labels)]
    label_feature = datasets.ClassLabel(names=list(NAMES)) if class_label else datasets.Value("string")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    values = labels if class_label else [NAMES[label] for label in labels]
    return datasets.Dataset.from_dict({image_column: images, label_column: values}, features=features)


def train_one_epoch(data, **settings) -> list[dict]:
    seed_everything(0)
    task = ImageClassifier(data.num_classes, BACKBONE, pretrained=False)
    return tiny_trainer(max_epochs=1, **settings).finetune(task, data, "no_freeze")


@pytest.fixture()
def scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["in_memory", "save_to_disk", "parquet_folder", "csv"])
def test_every_source_trains_end_to_end(tmp_path, scan_cache, kind):
    if kind == "in_memory":  # ClassLabel labels, non-RGB modes, a val dataset of its own
        modes = ("L", "RGBA", "P", "LA", "I;16")
        data = ImageClassificationData.from_datasets(image_dataset(8, class_label=True, modes=modes),
                                                     image_dataset(4, seed=1, class_label=True), **SETTINGS)
        expected = (24, 12)
    elif kind == "save_to_disk":  # train + validation splits: validation is found by name
        datasets.DatasetDict({"train": image_dataset(8), "validation": image_dataset(4, seed=1)}).save_to_disk(
            tmp_path / "saved")
        data = ImageClassificationData.from_hub(str(tmp_path / "saved"), **SETTINGS)
        expected = (24, 12)
    elif kind == "parquet_folder":  # one split: a stratified val_split of it
        (tmp_path / "parquet").mkdir()
        image_dataset(8).to_parquet(str(tmp_path / "parquet" / "train-00000-of-00001.parquet"))
        data = ImageClassificationData.from_hub(str(tmp_path / "parquet"), val_split=0.25, **SETTINGS)
        expected = (18, 6)
    else:
        root = write_image_folder(tmp_path / "images", per_class=8, seed=1)
        rows = ["path,label"] + [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
        (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
        data = ImageClassificationData.from_csv(str(tmp_path / "train.csv"), str(root), val_split=0.25, **SETTINGS)
        expected = (18, 6)
    assert data.classes == list(NAMES) and (len(data.train_paths), len(data.val_paths)) == expected
    metrics = train_one_epoch(data)
    assert metrics[0]["val_images"] == expected[1] and metrics[0]["train_images"] == expected[0] // 4 * 4
    image, label = data.train_dataset()[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == data.train_labels[0]


def test_class_names_come_from_the_classlabel_else_sorted_strings():
    named = image_dataset(3, class_label=True).cast_column("label", datasets.ClassLabel(names=["zebra", "ant", "moth"]))
    data = ImageClassificationData.from_datasets(named, val_split=0.34)
    assert data.classes == ["zebra", "ant", "moth"]  # the ClassLabel's order, not sorted
    renamed = {"blue": "zebra", "green": "ant", "red": "moth"}
    strings = image_dataset(3).map(lambda row: {"label": renamed[row["label"]]})
    data = ImageClassificationData.from_datasets(strings, val_split=0.34)
    assert data.classes == ["ant", "moth", "zebra"]
    for item, label in zip(data.train_paths, data.train_labels):
        assert strings[int(item.split("[")[1][:-1])]["label"] == data.classes[label]


def test_dataset_images_are_read_lazily_and_pickle_without_their_bytes(tmp_path):
    """A save_to_disk dataset is memory-mapped: a loader worker receives file names, not the images."""
    image_dataset(40).save_to_disk(tmp_path / "saved")
    data = ImageClassificationData.from_hub(str(tmp_path / "saved"), **SETTINGS)
    image_bytes = sum(len(encoded(0, i)) for i in range(120))
    assert len(pickle.dumps(data.train_dataset())) < image_bytes / 10
    assert all(item.startswith(f"{tmp_path / 'saved'}:train[") for item in data.train_paths)


def test_a_corrupt_image_in_a_dataset_is_named_or_skipped(scan_cache):
    broken = image_dataset(4)
    rows = broken.to_dict()
    rows["image"][5] = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=broken.features)
    data = ImageClassificationData.from_datasets(broken, image_dataset(2, seed=1), **SETTINGS)
    with pytest.raises(DataError, match=r"cannot read image train_dataset\[5\]"):
        data.train_dataset()[5]  # decoded lazily, in the worker, naming the row
    with pytest.raises(DataError, match=r"cannot read image train_dataset\[5\]: .*skip-bad-images"):
        train_one_epoch(data)  # stopped by the scan before training
    data = ImageClassificationData.from_datasets(broken, image_dataset(2, seed=1), skip_bad_images=True, **SETTINGS)
    assert list(data.check_images()) == ["train_dataset[5]"]
    assert "train_dataset[5]" not in data.train_paths and len(data.train_paths) == 11


def test_csv_errors_name_the_file_and_line(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=2, size=16)
    csv_file = tmp_path / "train.csv"
    good = ["blue/blue_0.png,blue", "red/red_0.png,red"]
    for rows, message in (
        (good + ["red/missing.png,red"], rf"{csv_file} line 3: image .*red/missing.png does not exist"),
        (good + ["", "green/green_0.png,"], rf"{csv_file} line 4: empty label for green/green_0.png"),
        (["path,label,extra"] + good, rf"{csv_file} line 1: expected 2 columns"),
    ):
        csv_file.write_text("\n".join(rows) + "\n")
        with pytest.raises(DataError, match=message):
            ImageClassificationData.from_csv(str(csv_file), str(root))
    csv_file.write_text("\n".join(good) + "\n")
    (tmp_path / "val.csv").write_text("blue/blue_1.png,blue\ngreen/green_1.png,green\n")
    with pytest.raises(DataError, match=r"val.csv: line 2 has label 'green', which .*train.csv does not have"):
        ImageClassificationData.from_csv(str(csv_file), str(root), val_csv=str(tmp_path / "val.csv"))


def test_dataset_errors_name_the_split_or_column(tmp_path):
    datasets.DatasetDict({"train": image_dataset(2), "test": image_dataset(2)}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"has no split 'valid' \(splits: \['test', 'train'\]\); set val_split_name"):
        ImageClassificationData.from_hub(str(tmp_path / "saved"), val_split_name="valid")
    with pytest.raises(DataError, match=r"no column 'labels' \(columns: \['image', 'label'\]\); set label_column"):
        ImageClassificationData.from_hub(str(tmp_path / "saved"), label_column="labels")
    with pytest.raises(DataError, match=r"no column 'img' .*set image_column"):
        ImageClassificationData.from_hub(str(tmp_path / "saved"), image_column="img")
    with pytest.raises(DataError, match=r"val_dataset: row 0 has label 'violet'"):
        other = image_dataset(2).map(lambda row: {"label": "violet"})
        ImageClassificationData.from_datasets(image_dataset(2), other)


def test_an_unreachable_hub_name_says_what_works_offline():
    with pytest.raises(DataError, match=r"cannot load dataset 'someone/beans' from the Hugging Face Hub .* internet "
                                        r"access.* parquet/arrow files or a save_to_disk folder.*--train-csv"):
        ImageClassificationData.from_hub("someone/beans")


def test_the_cli_trains_on_a_dataset_with_its_own_column_and_split_names(tmp_path, scan_cache):
    splits = {"fit": image_dataset(8, label_column="kind", image_column="picture"),
              "holdout": image_dataset(4, seed=1, label_column="kind", image_column="picture")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    main(["train", "--dataset", str(tmp_path / "saved"), "--image-column", "picture", "--label-column", "kind",
          "--train-split", "fit", "--val-split-name", "holdout", "--class-weights", "auto",
          "--backbone", BACKBONE, "--no-pretrained", "--strategy", "no_freeze", "--max-epochs", "1",
          "--batch-size", "4", "--image-size", "32", "--num-workers", "0", "--no-progress-bar",
          "--output-dir", str(tmp_path / "run")])
    metadata = read_metadata(tmp_path / "run" / "model.safetensors")
    assert metadata["labels"] == list(NAMES) and metadata["class_weights"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("raw, message", [
    ({"train_folder": "a", "dataset": "b"}, "set one source, not train_folder and dataset"),
    ({"dataset": "b", "train_csv": "c"}, "set one source, not dataset and train_csv"),
    ({"dataset": "b", "val_csv": "c"}, "data.val_csv is set but data.train_csv is not"),
    ({"train_csv": "c", "val_split_name": "v"}, "data.val_split_name is set but data.dataset is not"),
    ({"train_folder": "a", "class_weights": "balanced"}, "class_weights must be one of"),
])
def test_the_config_takes_exactly_one_source(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": raw})


def test_predict_labels_a_dataset_split_as_it_labels_the_same_images_as_files(tmp_path, scan_cache, capsys):
    """`predict --dataset`: one row per dataset row, named SPLIT[ROW], in order; a corrupt row is an
    error row; probabilities equal those of the same images predicted from files."""
    test = image_dataset(2, seed=3)
    rows = test.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][4] = {"bytes": b"not an image", "path": None}
    datasets.DatasetDict({"train": image_dataset(2), "test": datasets.Dataset.from_dict(rows, features=test.features)}
                         ).save_to_disk(tmp_path / "saved")
    files = []
    for index, image in enumerate(rows["image"]):
        files.append(tmp_path / "files" / f"{index}.png")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(image["bytes"])
    model = tmp_path / "m.safetensors"
    seed_everything(0)
    ImageClassifier(3, BACKBONE, pretrained=False, labels=list(NAMES), image_size=32).save_checkpoint(model)

    main(["predict", "--checkpoint", str(model), "--dataset", str(tmp_path / "saved"), "--split", "test",
          "--output", str(tmp_path / "d.jsonl"), "--top-k", "3", "--no-progress-bar"])
    main(["predict", "--checkpoint", str(model), *map(str, files), "--output", str(tmp_path / "f.jsonl"),
          "--top-k", "3", "--no-progress-bar"])
    from_dataset = [json.loads(line) for line in open(tmp_path / "d.jsonl")]
    from_files = [json.loads(line) for line in open(tmp_path / "f.jsonl")]
    assert [r["path"] for r in from_dataset] == [f"{tmp_path / 'saved'}:test[{i}]" for i in range(6)]
    assert "1 of 6 files could not be read" in capsys.readouterr().err
    for a, b in zip(from_dataset, from_files):
        assert a["label"] == b["label"] and (a["error"] is None) == (b["error"] is None)
        assert [t["probability"] for t in a["top_k"]] == pytest.approx([t["probability"] for t in b["top_k"]],
                                                                         abs=1e-6)
    assert from_dataset[4]["label"] is None and from_dataset[4]["error"]
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--checkpoint", str(model), "--dataset", str(tmp_path / "saved"), "--split", "validation"])
    assert exited.value.code == 2 and "has no split 'validation'" in capsys.readouterr().err


def test_a_dataset_folder_whose_path_has_pattern_characters_is_read_as_itself(tmp_path, scan_cache):
    """datasets reads a local folder's path as a glob pattern: data[1]/ matched data1/ (another dataset)."""
    for name, per_class in (("data[1]", 2), ("data1", 3)):
        (tmp_path / name).mkdir()
        image_dataset(per_class).to_parquet(str(tmp_path / name / "train.parquet"))
        datasets.DatasetDict({"train": image_dataset(per_class)}).save_to_disk(tmp_path / f"saved{name}")
    for folder in ("data[1]", "saveddata[1]"):
        data = ImageClassificationData.from_hub(str(tmp_path / folder), val_split=0.5, **SETTINGS)
        assert len(data.train_paths) + len(data.val_paths) == 6, folder


def test_a_csv_or_a_list_of_paths_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, which glued onto the header: '\\ufeffpath' read as an image."""
    from dist_finetune.prediction import expand_inputs

    root = write_image_folder(tmp_path / "images", classes=("blue", "red"), per_class=2, size=16)
    (tmp_path / "train.csv").write_text("path,label\nblue/blue_0.png,blue\nblue/blue_1.png,blue\n"
                                        "red/red_0.png,red\nred/red_1.png,red\n", encoding="utf-8-sig")
    data = ImageClassificationData.from_csv(str(tmp_path / "train.csv"), str(root), val_split=0.5)
    assert sorted(data.train_paths + data.val_paths) == sorted(str(p) for p in root.rglob("*.png"))
    (tmp_path / "list.txt").write_text(f"{root / 'red' / 'red_0.png'}\n", encoding="utf-8-sig")
    assert expand_inputs([], tmp_path / "list.txt") == [str(root / "red" / "red_0.png")]
    (tmp_path / "latin1.csv").write_bytes("path,label\nblue/blue_0.png,bl\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv is not UTF-8 text .*save it as UTF-8"):
        ImageClassificationData.from_csv(str(tmp_path / "latin1.csv"), str(root))


def write_csv(path, root, files) -> None:
    """``path``: rows ``<file relative to root>,<class folder>``, with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{f.relative_to(root)},{f.parent.name}\n" for f in files))


def test_the_cli_reads_csv_files_with_an_image_root_or_from_the_csvs_folder(tmp_path, scan_cache, capsys):
    """--train-csv/--val-csv with --image-root (csvs elsewhere), and without it: paths relative to the csv's
    folder, in the CLI (a dry run: every file read and checked) and in from_csv."""
    root = write_image_folder(tmp_path / "images", per_class=8, size=16, seed=1)
    files = sorted(root.rglob("*.png"))
    val_files = [f for f in files if int(f.stem.split("_")[1]) >= 6]  # 2 per class
    train_files = [f for f in files if f not in val_files]
    write_csv(tmp_path / "lists" / "train.csv", root, train_files)
    write_csv(tmp_path / "lists" / "val.csv", root, val_files)
    write_csv(root / "all.csv", root, files)
    common = ["--backbone", BACKBONE, "--no-pretrained", "--batch-size", "4", "--image-size", "32", "--num-workers", "0",
              "--strategy", "no_freeze", "--max-epochs", "1", "--dry-run"]
    main(["train", "--train-csv", str(tmp_path / "lists" / "train.csv"), "--val-csv", str(tmp_path / "lists" / "val.csv"),
          "--image-root", str(root), *common])
    printed = capsys.readouterr().out
    assert re.search(r"train: 18 images from .*train\.csv: blue 6, green 6, red 6", printed), printed
    assert re.search(r"val: 6 images from .*val\.csv: blue 2, green 2, red 2", printed), printed
    main(["train", "--train-csv", str(root / "all.csv"), "--val-split", "0.25", *common])
    printed = capsys.readouterr().out
    assert re.search(r"train: 18 images .*: blue 6, green 6, red 6", printed) and "val: 6 images" in printed, printed
    data = ImageClassificationData.from_csv(str(root / "all.csv"), val_split=0.25)
    assert sorted(data.train_paths + data.val_paths) == sorted(str(f) for f in files)


def test_the_image_column_may_hold_images_encoded_bytes_or_file_paths(tmp_path):
    """The same three images as datasets.Image values, as raw PNG bytes, and as paths: the same tensors."""
    rows = [(encoded(label, seed=label, mode=mode), NAMES[label]) for label, mode in enumerate(("RGB", "L", "P"))]
    paths = []
    for index, (content, _) in enumerate(rows):
        paths.append(str(tmp_path / f"{index}.png"))
        (tmp_path / f"{index}.png").write_bytes(content)
    labels = [label for _, label in rows] * 2
    columns = {
        "image": datasets.Dataset.from_dict({"image": [{"bytes": c, "path": None} for c, _ in rows] * 2,
                                             "label": labels}, features=image_dataset(1).features),
        "bytes": datasets.Dataset.from_dict({"image": [c for c, _ in rows] * 2, "label": labels}),
        "paths": datasets.Dataset.from_dict({"image": paths * 2, "label": labels}),
    }
    assert columns["bytes"].features["image"].dtype == "binary" and columns["paths"].features["image"].dtype == "string"
    decoded = {}
    for kind, dataset in columns.items():
        data = ImageClassificationData.from_datasets(dataset, val_split=0.5, **SETTINGS)
        data.check_images()
        validation = data.val_dataset()
        decoded[kind] = [validation[i] for i in range(len(validation))]
        assert sorted(label for _, label in decoded[kind]) == [0, 1, 2]
    for kind in ("bytes", "paths"):  # the same seeded split of the same bytes: the same val images, in order
        assert all(torch.equal(a, b) and y == z for (a, y), (b, z) in zip(decoded[kind], decoded["image"])), kind


@pytest.mark.parametrize("kind", ["in_memory", "csv"])
def test_a_killed_run_on_any_source_resumes_bit_exactly(tmp_path, scan_cache, kind):
    """Folders and save_to_disk datasets are resumed in test_resume and test_leakage (a parquet folder is
    read as save_to_disk is: memory-mapped Arrow files); in-memory datasets and csv files here: killed in
    epoch 1 after the step-5 checkpoint, resumed, the same final weights as uninterrupted."""
    from safetensors.torch import load_file

    if kind == "csv":
        root = write_image_folder(tmp_path / "images", per_class=6, size=16, seed=1)
        write_csv(root / "train.csv", root, sorted(root.rglob("*.png")))

    def data():
        if kind == "in_memory":
            return ImageClassificationData.from_datasets(image_dataset(6), val_split=0.25, **SETTINGS)
        return ImageClassificationData.from_csv(str(tmp_path / "images" / "train.csv"), val_split=0.25, **SETTINGS)

    def finetune(out, callbacks=(), resume=None):
        seed_everything(0)
        task = ImageClassifier(3, BACKBONE, pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(out), save_every_n_steps=5, callbacks=list(callbacks))
        trainer.finetune(task, data(), "no_freeze", resume=resume)
        return load_file(out / "last.safetensors"), trainer

    uninterrupted, _ = finetune(tmp_path / "a")
    with pytest.raises(Killed):
        finetune(tmp_path / "b", [kill_at(6)])  # 12 train images, 3 steps per epoch: epoch 1, batch 3
    resumed, trainer = finetune(tmp_path / "b", resume="latest")
    assert trainer.run.resumed_from.name == "step-00000005"
    assert uninterrupted.keys() == resumed.keys()
    assert [name for name in uninterrupted if not torch.equal(uninterrupted[name], resumed[name])] == []


def test_a_hub_name_is_loaded_with_load_dataset_and_its_validation_split_used(monkeypatch):
    """Offline stand-in for the Hub: datasets.load_dataset returns a train and a validation split for
    "someone/beans", as it would after a download; from_hub reads them through the same path."""
    asked = []

    def load_dataset(name, *args, **kwargs):
        asked.append(name)
        return datasets.DatasetDict({"train": image_dataset(4, class_label=True, label_column="labels"),
                                     "validation": image_dataset(2, seed=1, class_label=True, label_column="labels")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = ImageClassificationData.from_hub("someone/beans", label_column="labels", **SETTINGS)
    assert asked == ["someone/beans"]
    assert data.classes == list(NAMES) and (len(data.train_paths), len(data.val_paths)) == (12, 6)
    assert data.train_paths[0] == "someone/beans:train[0]" and data.val_paths[-1] == "someone/beans:validation[5]"
    assert sorted(data.val_labels) == [0, 0, 1, 1, 2, 2]
    image, label = data.val_dataset()[0]
    assert image.shape == (3, 32, 32) and label == data.val_labels[0]
