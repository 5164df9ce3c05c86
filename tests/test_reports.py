"""Evaluation reports and curves: `dist-finetune evaluate` (2 processes: integration/test_reports_ranks.py),
the end-of-training report, `dist-finetune plot`. The report's arithmetic itself is checked in test_evaluation.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKBONE, tiny_trainer, write_image_folder

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune.cli import main
from dist_finetune.run_files import read_jsonl
from dist_finetune.plots import MATPLOTLIB_HINT
from dist_finetune.reports import save_report

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, Path]:
    """A timm:test_resnet model file and a folder of 3 x 3 images: 3 batches of 4, 4, 1 (uneven over 2 ranks)."""
    root = tmp_path_factory.mktemp("evaluate")
    folder = write_image_folder(root / "images", per_class=3, size=36, seed=5)
    seed_everything(3)
    model = ImageClassifier(num_classes=3, backbone="timm:test_resnet", pretrained=False, labels=CLASSES,
                            image_size=32)
    model.save_checkpoint(root / "model.safetensors")
    return root / "model.safetensors", folder


def evaluate_args(model: Path, folder: Path, out: Path) -> list[str]:
    return ["evaluate", "--checkpoint", str(model), "--data-folder", str(folder), "--output-dir", str(out),
            "--batch-size", "4", "--num-workers", "0"]


@pytest.fixture(scope="module")
def one_process_report(saved_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval1")
    main(evaluate_args(*saved_model, out))
    return out


def test_evaluate_prints_the_table_and_writes_the_files(saved_model, one_process_report, capsys):
    model_file, folder = saved_model
    report = json.loads((one_process_report / "report.json").read_text())
    assert report["num_images"] == 9 and [row["support"] for row in report["per_class"]] == [3, 3, 3]
    # the confusion matrix agrees with what the model predicts file by file (another code path)
    model = ImageClassifier.load_from_checkpoint(model_file)
    paths = sorted(str(path) for path in folder.rglob("*.png"))
    expected = np.zeros((3, 3), dtype=int)
    for path, (label, _) in zip(paths, model.predict_with_scores(paths)):
        expected[CLASSES.index(Path(path).parent.name), CLASSES.index(label)] += 1
    assert report["confusion_matrix"] == expected.tolist()
    assert report["accuracy"] == pytest.approx(np.trace(expected) / 9)
    assert sorted(row["path"] for row in report["top_losses"]) == paths  # 9 images < 10: all listed
    assert report["model"] == {"checkpoint": str(model_file)}
    assert sorted(p.name for p in one_process_report.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.png",
                                                                     "report.json"]
    main(evaluate_args(model_file, folder, one_process_report))  # again, to read what it prints
    printed = capsys.readouterr().out
    for row in report["per_class"]:
        assert f"{row['class']} " in printed and f"{row['recall']:.3f}" in printed
    assert f"{'accuracy':<14}" in printed and "report written:" in printed


def png_size(path: Path) -> tuple[int, int]:
    """The decoded PNG's size; a picture with a single colour (nothing drawn) fails."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
        return image.size


def test_end_of_training_report_and_plot_command(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone=BACKBONE, pretrained=False)
    history = tiny_trainer(output_dir=str(out)).finetune(task, tiny_data, strategy=("freeze_unfreeze", 1))
    printed = capsys.readouterr().out
    best = [record for record in read_jsonl(out / "metrics.jsonl") if record.get("best")][-1]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"epoch": best["epoch"], "weights": "best"}
    assert report["accuracy"] == pytest.approx(best["val_acc"]) and report["loss"] == pytest.approx(best["val_loss"])
    assert report["num_images"] == len(tiny_data.val_paths) == 12
    assert len(history) == 3 and f"validation report of epoch {best['epoch']}'s weights" in printed
    assert str(out / "confusion_matrix.png") in printed and str(out / "curves.png") in printed
    assert png_size(out / "curves.png") == (1600, 480) and png_size(out / "confusion_matrix.png")[0] > 100
    first = (out / "curves.png").read_bytes()

    (out / "curves.png").unlink()
    main(["plot", str(out)])
    assert f"curves written: {out / 'curves.png'}" in capsys.readouterr().out
    assert (out / "curves.png").read_bytes() == first  # drawn from the run's files alone: the same picture
    main(["plot", str(out), "--output", str(tmp_path / "elsewhere.png")])
    assert f"curves written: {tmp_path / 'elsewhere.png'}" in capsys.readouterr().out
    assert (tmp_path / "elsewhere.png").read_bytes() == first
    with pytest.raises(SystemExit) as exited:
        main(["plot", str(tmp_path)])  # not a run folder
    assert exited.value.code == 2 and "metrics.jsonl not found" in capsys.readouterr().err


def test_without_matplotlib_the_hint_is_said_once(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib now raises ImportError
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "lr": [0.1]}) + "\n")
    from dist_finetune.evaluation import build_report

    said = []
    written = save_report(build_report([0, 1], [[1.0, 0.0], [0.0, 1.0]], ["a", "b"]), tmp_path, said.append,
                          curves=True)
    assert [path.name for path in written] == ["report.json", "confusion_matrix.csv"]
    assert [line for line in said if MATPLOTLIB_HINT in line] == [
        f"{MATPLOTLIB_HINT} (confusion_matrix.png and curves.png skipped)"]


def test_evaluate_refuses_unknown_classes(saved_model, tmp_path, capsys):
    folder = write_image_folder(tmp_path / "other", classes=("blue", "purple"), per_class=1, size=36)
    with pytest.raises(SystemExit) as exited:
        main(evaluate_args(saved_model[0], folder, tmp_path / "out"))
    assert exited.value.code == 2
    assert "class(es) ['purple'] the model does not know" in capsys.readouterr().err


def test_evaluate_reads_only_the_split_it_evaluates(saved_model, tmp_path, monkeypatch):
    """--split test: the validation split, with a class the model does not know, is neither read nor checked."""
    import datasets
    from test_sources import image_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    purple = image_dataset(1, seed=2).map(lambda row: {"label": "purple"})
    datasets.DatasetDict({"test": image_dataset((1, 0, 2)), "validation": purple}).save_to_disk(tmp_path / "saved")
    main(["evaluate", "--checkpoint", str(saved_model[0]), "--dataset", str(tmp_path / "saved"), "--split", "test",
          "--output-dir", str(tmp_path / "out"), "--batch-size", "4", "--num-workers", "0"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["num_images"] == 3 and [row["support"] for row in report["per_class"]] == [1, 0, 2]


def test_evaluate_takes_images_of_one_of_the_models_classes(saved_model, tmp_path, monkeypatch):
    """A folder (or a dataset split) holding one class is a subset of the model's classes like any other."""
    import datasets
    from test_sources import image_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "green_only", classes=("green",), per_class=2, size=36)
    datasets.DatasetDict({"test": image_dataset((0, 0, 3))}).save_to_disk(tmp_path / "saved")
    sources = {"--data-folder": (folder, [0, 2, 0]), "--dataset": (tmp_path / "saved", [0, 0, 3])}
    for option, (source, supports) in sources.items():
        main(["evaluate", "--checkpoint", str(saved_model[0]), option, str(source), "--output-dir",
              str(tmp_path / "out"), "--batch-size", "4", "--num-workers", "0"])
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["classes"] == CLASSES and [row["support"] for row in report["per_class"]] == supports


def test_keep_last_model_reports_the_last_epochs_weights(tiny_data, tmp_path):
    """A callback makes epoch 0 the best by val_acc (recording the real metrics first); with
    load_best_model_at_end=False (--keep-last-model) the report scores the last epoch's weights."""
    from dist_finetune.callbacks import Callback

    class EpochZeroIsBest(Callback):
        real: list = []

        def on_validation_end(self, trainer, run, record):
            self.real.append({key: record[key] for key in ("val_acc", "val_loss")})
            record["val_acc"] = 1.0 if record["epoch"] == 0 else 0.0

    seed_everything(0)
    task = ImageClassifier(num_classes=3, backbone=BACKBONE, pretrained=False)
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path), load_best_model_at_end=False,
                 callbacks=[EpochZeroIsBest()]).finetune(task, tiny_data, strategy="freeze")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == {"epoch": 1, "weights": "last"}
    assert report["accuracy"] == pytest.approx(EpochZeroIsBest.real[1]["val_acc"])
    assert report["loss"] == pytest.approx(EpochZeroIsBest.real[1]["val_loss"], rel=1e-5)


def test_evaluate_stops_on_an_unreadable_image_naming_it(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "images", classes=("blue", "red"), per_class=2, size=36)
    (folder / "red" / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(SystemExit) as exited:
        main(evaluate_args(saved_model[0], folder, tmp_path / "out"))
    assert exited.value.code == 2 and f"cannot read image {folder / 'red' / 'broken.png'}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_evaluate_lists_as_many_top_losses_as_asked(saved_model, tmp_path):
    main([*evaluate_args(*saved_model, tmp_path / "out"), "--top-losses", "2"])
    losses = [row["loss"] for row in json.loads((tmp_path / "out" / "report.json").read_text())["top_losses"]]
    assert len(losses) == 2 and losses[0] >= losses[1]
