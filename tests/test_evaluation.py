"""Evaluation report: every number checked against values worked out by hand; reports of fifty classes."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from dist_finetune.evaluation import build_report, format_report, png_classes, write_report

CLASSES = ["cat", "dog", "bird"]
# Predictions (argmax): cat, cat, dog | dog, dog, cat | dog, dog -- "bird" is never predicted.
LABELS = [0, 0, 0, 1, 1, 1, 2, 2]
LOGITS = [
    [2.0, 0.0, 0.0],
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 3.0, 0.0],
    [0.0, 1.0, 0.0],
    [2.0, 0.0, 1.0],
    [0.0, 1.0, 0.0],
    [0.0, 2.0, -1.0],
]
PATHS = [f"img{i}.png" for i in range(8)]


def cross_entropy(row, label):
    return -(row[label] - math.log(sum(math.exp(value) for value in row)))


@pytest.fixture
def report():
    return build_report(torch.tensor(LABELS), torch.tensor(LOGITS, dtype=torch.bfloat16), CLASSES, paths=PATHS)


def test_counts_and_per_class_metrics(report):
    assert report["num_images"] == 8 and report["num_classes"] == 3 and report["classes"] == CLASSES
    assert report["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 2, 0]]
    assert report["accuracy"] == pytest.approx(4 / 8)
    assert "top5_accuracy" not in report
    expected = [  # class, precision, recall, f1, support, predicted
        ("cat", 2 / 3, 2 / 3, 2 / 3, 3, 3),
        ("dog", 2 / 5, 2 / 3, 1 / 2, 3, 5),
        ("bird", 0.0, 0.0, 0.0, 2, 0),  # never predicted: precision and f1 are 0 by convention
    ]
    for row, (name, precision, recall, f1, support, predicted) in zip(report["per_class"], expected):
        assert row["class"] == name
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert (row["support"], row["predicted"]) == (support, predicted)
    assert report["macro_avg"] == pytest.approx({"precision": (2 / 3 + 2 / 5) / 3, "recall": (2 / 3 + 2 / 3) / 3,
                                                 "f1": (2 / 3 + 1 / 2) / 3})
    assert report["weighted_avg"] == pytest.approx({"precision": (3 * 2 / 3 + 3 * 2 / 5) / 8,
                                                    "recall": (3 * 2 / 3 + 3 * 2 / 3) / 8,
                                                    "f1": (3 * 2 / 3 + 3 * 1 / 2) / 8})
    losses = [cross_entropy(row, label) for row, label in zip(LOGITS, LABELS)]
    assert report["loss"] == pytest.approx(sum(losses) / 8, rel=1e-12)
    json.dumps(report, allow_nan=False)  # plain, strict JSON types only


def test_most_confused_order_and_limit(report):
    assert report["most_confused"] == [
        {"true": "bird", "predicted": "dog", "count": 2},
        {"true": "cat", "predicted": "dog", "count": 1},  # ties: lower true class first
        {"true": "dog", "predicted": "cat", "count": 1},
    ]
    limited = build_report(LABELS, LOGITS, CLASSES, most_confused=2)["most_confused"]
    assert [(c["true"], c["predicted"]) for c in limited] == [("bird", "dog"), ("cat", "dog")]
    # Same true class: lower predicted class first.
    tied = build_report([0, 0], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], CLASSES)["most_confused"]
    assert [c["predicted"] for c in tied] == ["dog", "bird"]


def test_top_losses(report):
    # Images 2 and 6 (and 1 and 4) have exactly equal losses: input order decides.
    assert [row["path"] for row in report["top_losses"]] == [f"img{i}.png" for i in (7, 5, 2, 6, 1, 4, 0, 3)]
    worst = report["top_losses"][0]
    assert (worst["true"], worst["predicted"]) == ("bird", "dog")
    assert worst["loss"] == pytest.approx(cross_entropy(LOGITS[7], 2), rel=1e-12)
    assert worst["probability"] == pytest.approx(math.exp(2) / (1 + math.exp(2) + math.exp(-1)), rel=1e-12)
    first_three = build_report(np.array(LABELS), np.array(LOGITS), CLASSES, top_losses=3)["top_losses"]
    assert [row["index"] for row in first_three] == [7, 5, 2] and "path" not in first_three[0]
    assert first_three[1]["loss"] == pytest.approx(cross_entropy(LOGITS[5], 1), rel=1e-12)


def test_top5_only_above_five_classes():
    names = [f"c{i}" for i in range(7)]
    ranked = [9, 8, 7, 6, 5, 4, 3]  # class i is ranked (i + 1)-th
    logits = [[9, 1, 2, 3, 4, 5, 6], ranked, ranked, ranked]
    # Label 0 first: top-1 hit. Labels 3 and 4 (4th and 5th): top-1 miss, top-5 hit. Label 5 (6th): both miss.
    report = build_report([0, 3, 4, 5], logits, names)
    assert report["accuracy"] == pytest.approx(1 / 4)
    assert report["top5_accuracy"] == pytest.approx(3 / 4)
    assert "top-5 accuracy" in format_report(report)
    tied = build_report([4, 5], [[0.0] * 7] * 2, names)  # equal logits rank by class index, as argmax does
    assert (tied["accuracy"], tied["top5_accuracy"]) == (0.0, 0.5)
    assert "top5_accuracy" not in build_report([0], [[1, 0, 0, 0, 0]], names[:5])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2 class names for 3 logits"):
        build_report(LABELS, LOGITS, CLASSES[:2])
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        build_report([0, 3], LOGITS[:2], CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        build_report([0], [[float("nan"), 0.0, 0.0]], CLASSES)


def test_format_report(report):
    text = format_report(report)
    for name in CLASSES:
        assert f"\n{name} " in text
    accuracy_line = next(line for line in text.splitlines() if line.startswith("accuracy"))
    assert accuracy_line.split() == ["accuracy", "0.500", "8"]
    assert "bird -> dog: 2" in text
    assert "top-5" not in text


def test_write_report(report, tmp_path):
    written = write_report(report, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == report
    with open(tmp_path / "eval" / "confusion_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true\\predicted", *CLASSES]
    assert [row[0] for row in rows[1:]] == CLASSES
    assert [[int(count) for count in row[1:]] for row in rows[1:]] == report["confusion_matrix"]
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == sorted(path.name for path in written)
    pytest.importorskip("matplotlib")
    assert written[-1].name == "confusion_matrix.png"
    assert written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_matplotlib(report, tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib now raises ImportError
    written = write_report(report, tmp_path)
    assert [path.name for path in written] == ["report.json", "confusion_matrix.csv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["confusion_matrix.csv", "report.json"]


def test_evaluation_loader_sizes_workers_for_this_machines_processes(monkeypatch, image_folders):
    """2 nodes x 8 processes on 64-core machines: 64 // 8 - 1 = 7 workers per process, not 64 // 16 - 1 = 3
    (on 16 cores the global count gave 0 workers and the GPUs waited for images)."""
    from types import SimpleNamespace

    from dist_finetune import ImageClassificationData, ImageClassifier
    from dist_finetune.inference import eval_loader

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4)
    on_the_cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=16, prepare_data_loader=lambda loader: loader)
    assert eval_loader(ImageClassifier(3, "tiny_resnet", pretrained=False), data, on_the_cpu).num_workers == 7


NAMES = [f"c{i:02d}" for i in range(60)]


def fifty_class_report():
    """Two images per class, all right but class 07's (both taken for 03) and one of class 12's (taken for 40)."""
    labels = np.repeat(np.arange(50), 2)
    predicted = labels.copy()
    predicted[[14, 15]] = 3
    predicted[24] = 40
    logits = np.full((100, 50), -5.0)
    logits[np.arange(100), predicted] = 5.0
    return build_report(labels, logits, NAMES[:50])


def test_the_report_of_fifty_classes_prints_the_worst_and_keeps_the_full_matrix_in_its_files(tmp_path):
    report = fifty_class_report()
    text = format_report(report).splitlines()
    assert text[0] == "the 10 worst of 50 classes by F1 (every class: report.json, confusion_matrix.csv):"
    table = text[2:12]
    assert [line.split()[0] for line in table[:4]] == ["c07", "c12", "c03", "c40"]  # F1 ties: lower recall first
    assert not any(line.startswith("c49") for line in text)
    assert "  c07 -> c03: 2" in text and "  c12 -> c40: 1" in text
    write_report(report, tmp_path)
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert len(rows) == 51 and rows[0][1:] == NAMES[:50] and rows[8][4] == "2" and rows[13][41] == "1"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert np.array(saved["confusion_matrix"]).shape == (50, 50) and len(saved["per_class"]) == 50


def test_the_png_of_fifty_classes_shows_the_25_most_involved_in_errors():
    assert png_classes(fifty_class_report()) == [*range(24), 40]
    assert png_classes(build_report([0, 1, 2], np.eye(3), NAMES[:3])) == [0, 1, 2]
