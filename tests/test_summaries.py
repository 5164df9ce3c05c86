"""Outputs that stay readable at many classes: above a few dozen, the class counts, the printed report and
confusion_matrix.png summarise, while report.json and confusion_matrix.csv keep every class."""

from __future__ import annotations

import csv
import json

import numpy as np

from dist_finetune.evaluation import build_report, format_report, png_classes, write_report
from dist_finetune.splits import class_count_lines

NAMES = [f"c{i:02d}" for i in range(60)]


def test_class_counts_above_a_few_dozen_classes_are_min_median_max_with_the_smallest_named():
    train = [label for label in range(60) for _ in range(10 + label)]
    val = [label for label in range(60) for _ in range(2)]
    assert class_count_lines(NAMES, train, val) == [
        f"images per class (train / val), {len(train)} / 120 in all:",
        "  train: 60 classes, min 10 / median 40 / max 69 images; smallest: c00 (10), c01 (11), c02 (12), c03 (13), "
        "c04 (14)",
        "  val: 60 classes, min 2 / median 2 / max 2 images; smallest: c00 (2), c01 (2), c02 (2), c03 (2), c04 (2)"]
    assert len(class_count_lines(NAMES[:3], [0, 1, 2], [0, 1, 2])) == 4  # a table below


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
