"""Batch prediction: the same logits as validation, unreadable files as error rows (exit 0, or 3 with
--strict), top-k, CSV/JSONL streaming, the device. Two processes: integration/test_prediction_ranks.py."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_finetune import ImageClassificationData, ImageClassifier
from dist_finetune.cli import main
from dist_finetune.errors import ConfigError, DataError
from dist_finetune.images import list_image_files
from dist_finetune.prediction import (
    CsvWriter,
    JsonlWriter,
    UNREADABLE_EXIT_CODE,
    Prediction,
    model_device,
    predict_batches,
    predict_paths,
    predict_to_file,
    select_device,
)

CLASSES = ["blue", "green", "red"]


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs larger than the eval size, so that predict's draft decode is exercised."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((200, 150), Image.BICUBIC)
        paths.append(str(folder / f"photo_{i}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def test_predict_gives_validation_logits(tmp_path):
    paths = write_jpegs(tmp_path / "val", 7)
    torch.manual_seed(0)
    ImageClassifier(3, "tiny_resnet", pretrained=False, labels=CLASSES, image_size=32).save_checkpoint(
        tmp_path / "m.safetensors")
    model = ImageClassifier.load_from_checkpoint(tmp_path / "m.safetensors")
    data = ImageClassificationData([], [], paths, [0] * len(paths), CLASSES, image_size=32)
    dataset = data.val_dataset()  # what Trainer.validate decodes
    with torch.no_grad():
        expected = model(torch.stack([dataset[i][0] for i in range(len(dataset))])).softmax(dim=1)
    rows = predict_paths(model, paths, batch_size=3, top_k=3, num_workers=1, device="cpu")
    assert [row.path for row in rows] == paths
    got = torch.tensor([[dict(row.top_k)[label] for label in CLASSES] for row in rows])
    assert (got - expected).abs().max().item() < 1e-6
    assert [row.label for row in rows] == [CLASSES[i] for i in expected.argmax(dim=1).tolist()]
    assert model.predict(paths) == [row.label for row in rows]  # the Python API, same pipeline


def fixed_probability_model(probabilities: list[float]) -> ImageClassifier:
    """A classifier whose output is ``probabilities`` for every image (zero head weights, log-prob bias)."""
    model = ImageClassifier(len(probabilities), "tiny_resnet", pretrained=False, image_size=32,
                            labels=[f"c{i}" for i in range(len(probabilities))])
    with torch.no_grad():
        model.head.layers[-1].weight.zero_()
        model.head.layers[-1].bias.copy_(torch.tensor(probabilities).log())
    return model


def test_top_k_csv_and_jsonl(image_folders, tmp_path):
    model = fixed_probability_model([0.1, 0.4, 0.2, 0.3])
    paths = list_image_files(image_folders / "val" / "red")[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    inputs = [paths[0], str(bad), *paths[1:]]
    predict_to_file(model, inputs, str(tmp_path / "p.csv"), top_k=3, progress=False, batch_size=2, device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["path", "label", "probability", "error", "label_2", "probability_2", "label_3",
                             "probability_3"]
    assert [row["path"] for row in rows] == inputs
    good = rows[0]
    assert (good["label"], good["label_2"], good["label_3"]) == ("c1", "c3", "c2")
    assert [float(good[k]) for k in ("probability", "probability_2", "probability_3")] == pytest.approx(
        [0.4, 0.3, 0.2], abs=1e-6)
    assert rows[1]["label"] == rows[1]["probability"] == rows[1]["label_2"] == "" and "empty" in rows[1]["error"]

    summary = predict_to_file(model, inputs, str(tmp_path / "p.jsonl"), top_k=9, progress=False, device="cpu")
    assert (summary.images, summary.unreadable) == (4, 1) and str(bad) in summary.first_unreadable
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]  # format from the extension
    assert [r["path"] for r in records] == inputs
    assert records[0]["error"] is None and records[0]["label"] == "c1"
    assert [(t["label"], t["probability"]) for t in records[0]["top_k"]] == [  # K clamped to the 4 classes
        ("c1", 0.4), ("c3", 0.3), ("c2", 0.2), ("c0", 0.1)]
    error = records[1].pop("error")
    assert records[1] == {"path": str(bad), "label": None, "probability": None, "top_k": []}
    assert error == "empty file (0 bytes)"  # no train hint (skip-bad-images) in predict's rows


@pytest.mark.parametrize("writer_class", [CsvWriter, JsonlWriter])
def test_every_batch_reaches_the_file_at_once(tmp_path, writer_class):
    """Streaming: what a reader sees while the run goes on (or after a kill) is every finished batch."""
    path = tmp_path / "out"
    with open(path, "w") as handle:
        writer = writer_class(handle, top_k=2)
        writer.write([Prediction("a.jpg", "cat", 0.75, (("cat", 0.75), ("dog", 0.25)))])
        writer.write([Prediction("b.jpg", None, None, (), "cannot identify image file")])
        seen = path.read_text().splitlines()  # the file is still open
    if writer_class is CsvWriter:
        assert list(csv.reader(seen)) == [["path", "label", "probability", "error", "label_2", "probability_2"],
                                          ["a.jpg", "cat", "0.750000", "", "dog", "0.250000"],
                                          ["b.jpg", "", "", "cannot identify image file", "", ""]]
    else:
        assert [json.loads(line)["path"] for line in seen] == ["a.jpg", "b.jpg"]
        assert json.loads(seen[0])["top_k"][1] == {"label": "dog", "probability": 0.25}


def test_python_api_raises_on_an_unreadable_file_without_the_train_hint(tmp_path, image_folders):
    model = fixed_probability_model([0.5, 0.5])
    (tmp_path / "notes.jpg").write_text("not a picture")
    good = list_image_files(image_folders / "val")[0]
    assert model.predict_with_scores([good], device="cpu") == [("c0", pytest.approx(0.5))]
    with pytest.raises(DataError, match="notes.jpg: cannot identify image file") as raised:
        model.predict([good, str(tmp_path / "notes.jpg")])
    assert "--skip-bad-images" not in str(raised.value)
    assert model.training, "predict restores the model's mode"


def test_gpu_is_selected_when_cuda_is_present(monkeypatch):
    model = ImageClassifier(2, "tiny_resnet", pretrained=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == select_device(None) == torch.device("cuda")
    assert model_device(model) == torch.device("cuda"), "a model on the CPU runs on the GPU when there is one"
    assert select_device("cpu") == model_device(model, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == model_device(model) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        select_device("cuda")


@pytest.mark.parametrize("launched, expected", [(None, None), ("bf16", torch.bfloat16)])
def test_one_process_predicts_in_the_launch_configs_precision(monkeypatch, image_folders, launched, expected):
    """`accelerate launch --num_processes 1 --mixed_precision bf16 -m dist_finetune predict` runs without an
    accelerator; its precision (ACCELERATE_MIXED_PRECISION) is still the default, as --mixed-precision says."""
    if launched:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    model = fixed_probability_model([0.5, 0.5])
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    predict_paths(model, list_image_files(image_folders / "val" / "red")[:2], device="cpu", num_workers=0)
    assert seen == [expected]


def test_a_chosen_gpu_is_made_current_before_batches_are_pinned(monkeypatch, image_folders):
    """Pinned memory goes to the current CUDA device: with --device cuda:1 that must be GPU 1, or the
    loader opens a second context on cuda:0. The device is set when prediction starts, before any batch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    model = fixed_probability_model([0.5, 0.5])
    batches = predict_batches(model, list_image_files(image_folders / "val" / "red"), device="cuda:1")
    assert made_current == [torch.device("cuda", 1)]
    batches.close()  # never started: nothing touched a GPU


# ------------------------------------------------------------------- the command line, in this process


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    fixed_probability_model([0.2, 0.5, 0.3]).save_checkpoint(path)
    return path


def tiny_png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return str(path)


def test_a_folder_is_listed_recursively_in_sorted_order(saved_model, tmp_path):
    root = tmp_path / "in"
    for name in ("b.png", "a/z.png", "B/y.png", "a/deep/x.png", "a/c.png", "notes.txt"):
        tiny_png(root / name) if name.endswith(".png") else (root / name).write_text("not an image file name")
    main(["predict", "--checkpoint", str(saved_model), str(root), "--output", str(tmp_path / "p.csv"),
          "--no-progress-bar", "--num-workers", "0"])
    listed = [row["path"] for row in csv.DictReader(open(tmp_path / "p.csv"))]
    assert listed == [str(root / name) for name in ("B/y.png", "a/c.png", "a/deep/x.png", "a/z.png", "b.png")]


def test_a_missing_input_stops_before_any_work_and_a_missing_listed_file_is_an_error_row(saved_model, tmp_path,
                                                                                         capsys):
    good = tiny_png(tmp_path / "good.png")
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--checkpoint", str(saved_model), good, str(tmp_path / "gone.png"),
              "--output", str(tmp_path / "p.csv"), "--no-progress-bar"])
    assert exited.value.code == 2 and not (tmp_path / "p.csv").exists()
    assert f"input {tmp_path / 'gone.png'} does not exist" in capsys.readouterr().err
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'gone.png'}\n{good}\n")
    main(["predict", "--checkpoint", str(saved_model), "--paths-from", str(tmp_path / "list.txt"),
          "--output", str(tmp_path / "p.csv"), "--no-progress-bar", "--num-workers", "0"])
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [(row["path"], row["label"]) for row in rows] == [(str(tmp_path / "gone.png"), ""), (good, "c1")]
    assert rows[0]["error"] and not rows[1]["error"]
    with pytest.raises(SystemExit) as exited:  # --strict: the rows are written, then exit 3
        main(["predict", "--checkpoint", str(saved_model), "--paths-from", str(tmp_path / "list.txt"),
              "--output", str(tmp_path / "strict.csv"), "--no-progress-bar", "--num-workers", "0", "--strict"])
    assert exited.value.code == UNREADABLE_EXIT_CODE == 3
    assert (tmp_path / "strict.csv").read_text() == (tmp_path / "p.csv").read_text()


def test_format_flag_overrides_the_extension(saved_model, tmp_path):
    good = tiny_png(tmp_path / "good.png")
    common = ["predict", "--checkpoint", str(saved_model), good, "--no-progress-bar", "--num-workers", "0"]
    main([*common, "--output", str(tmp_path / "p.csv"), "--format", "jsonl"])
    assert json.loads((tmp_path / "p.csv").read_text()) == {"path": good, "label": "c1", "probability": 0.5,
                                                            "error": None}
    main([*common, "--output", str(tmp_path / "p.jsonl"), "--format", "csv"])
    assert (tmp_path / "p.jsonl").read_text().splitlines() == ["path,label,probability,error", f"{good},c1,0.500000,"]


def test_progress_bar_and_final_count_line(saved_model, tmp_path, capsys):
    paths = [tiny_png(tmp_path / f"{i}.png") for i in range(3)]
    common = ["predict", "--checkpoint", str(saved_model), *paths, "--output", str(tmp_path / "p.csv"),
              "--num-workers", "0", "--batch-size", "2"]
    main(common)
    err = capsys.readouterr().err
    assert "predict: 100%" in err and "3/3" in err  # tqdm's bar on stderr
    assert re.search(r"dist-finetune predict: 3 images in \d+\.\d s \(\d+\.\d images/s\)", err)
    main([*common, "--no-progress-bar"])
    err = capsys.readouterr().err
    assert "predict: " not in err.replace("dist-finetune predict: ", "") and "3 images in" in err


def test_mixed_precision_flag_autocasts_the_forward(saved_model, tmp_path, monkeypatch):
    seen = []
    loaded = ImageClassifier.load_from_checkpoint

    def load_and_watch(*args, **kwargs):
        model = loaded(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return model

    monkeypatch.setattr(ImageClassifier, "load_from_checkpoint", load_and_watch)
    good = tiny_png(tmp_path / "good.png")
    common = ["predict", "--checkpoint", str(saved_model), good, "--no-progress-bar", "--num-workers", "0",
              "--output", str(tmp_path / "p.csv")]
    main(common)
    main([*common, "--mixed-precision", "bf16"])
    assert seen == [None, torch.bfloat16]


def test_cli_device_choices(saved_model, tmp_path, monkeypatch, capsys):
    good = tiny_png(tmp_path / "good.png")
    common = ["predict", "--checkpoint", str(saved_model), good, "--no-progress-bar", "--num-workers", "0",
              "--output", str(tmp_path / "p.csv")]
    main([*common, "--device", "cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        main([*common, "--device", "cuda:1"])
    assert exited.value.code == 2 and "device cuda:1 requested but torch sees no CUDA device" in capsys.readouterr().err


def test_a_device_other_than_the_launchers_is_refused():
    from types import SimpleNamespace

    from dist_finetune.prediction import launcher_device

    given = SimpleNamespace(device=torch.device("cpu"))
    assert launcher_device(given, "auto") == launcher_device(given, None) == launcher_device(given, "cpu") == \
        torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda:1 conflicts with the launcher, which gave this process cpu"):
        launcher_device(given, "cuda:1")


def test_loader_defaults_workers_and_pinned_memory(monkeypatch, image_folders):
    """Workers: cores / local processes - 1 (at most 8), none for a single batch; pinned memory on a GPU only."""
    from dist_finetune import prediction

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    paths = list_image_files(image_folders / "val")  # 12 files
    assert prediction.prediction_loader(paths, 32, 4, local_processes=2).num_workers == 3
    assert prediction.prediction_loader(paths, 32, 12).num_workers == 0  # one batch: decoded in this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert prediction.prediction_loader(paths, 32, 4).num_workers == 8
    built = []
    monkeypatch.setattr(prediction, "prediction_loader", lambda *args: built.append(args) or [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    model = fixed_probability_model([0.5, 0.5])
    predict_batches(model, paths, device="cuda:0").close()
    predict_batches(model, paths, device="cpu").close()
    assert [args[4] for args in built] == [True, False]  # pin_memory


@pytest.mark.parametrize("tune, expected", [(True, 1), (False, 0)])
def test_predict_keeps_freed_memory_on_the_cpu_unless_told_not_to(monkeypatch, image_folders, tune, expected):
    from dist_finetune import prediction

    calls = []
    monkeypatch.setattr(prediction, "keep_freed_memory", lambda: calls.append(1) or "kept")
    paths = list_image_files(image_folders / "val" / "red")[:1]
    predict_paths(fixed_probability_model([0.5, 0.5]), paths, device="cpu", num_workers=0, tune_cpu_allocator=tune)
    assert len(calls) == expected


def test_load_from_checkpoint_map_location(saved_model, monkeypatch):
    """"auto" without a GPU: the CPU; "cuda" without one is an error naming the fix (with one: select_device,
    test_gpu_is_selected_when_cuda_is_present)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = ImageClassifier.load_from_checkpoint(saved_model, map_location="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ConfigError, match="device cuda requested but torch sees no CUDA device"):
        ImageClassifier.load_from_checkpoint(saved_model, map_location="cuda")
