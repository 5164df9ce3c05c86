"""Prediction over two processes: the same rows, complete and in order, as one process writes (with --tta flip:
each rank mirrors its own batches)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import free_port, write_image_folder
from test_prediction import CLASSES

from dist_finetune import ImageClassifier
from dist_finetune.cli import main
from dist_finetune.images import list_image_files


ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch_predict(*args, processes: int = 2) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--num_processes", str(processes), "--main_process_port", str(free_port()), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    return subprocess.run([*launch, "-m", "dist_finetune", "predict", *args, "--no-progress-bar"],
                          capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.distributed
def test_two_processes_write_what_one_writes(tmp_path, capsys):
    """13 files (batch 2 x 2 processes leaves a remainder of 1), one unreadable: rows complete, in input order."""
    folder = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=5, size=40)
    (folder / "a" / "zz_notes.jpg").write_text("not a picture")
    extra = write_image_folder(tmp_path / "extra", classes=("c",), per_class=2, size=40)
    first, listed = list_image_files(extra)
    (tmp_path / "list.txt").write_text(f"{listed}\n\n")
    names = [f"a/a_{i}.png" for i in range(5)] + ["a/zz_notes.jpg"] + [f"b/b_{i}.png" for i in range(5)]
    expected = [*(str(folder / name) for name in names), str(extra / "c" / "c_0.png"), str(extra / "c" / "c_1.png")]
    assert [first, listed] == expected[-2:] and len(expected) == 13
    ImageClassifier(3, backbone="timm:test_resnet", pretrained=False, labels=CLASSES, image_size=32).save_checkpoint(
        tmp_path / "m.safetensors")
    args = ["--checkpoint", str(tmp_path / "m.safetensors"), str(folder), first, "--paths-from",
            str(tmp_path / "list.txt"), "--batch-size", "2", "--num-workers", "1", "--top-k", "2", "--tta", "flip"]

    main(["predict", *args, "--output", str(tmp_path / "one.csv"), "--no-progress-bar"])  # one process: here
    stderr = capsys.readouterr().err  # without --strict: exit 0 (main returned)
    assert "1 of 13 files could not be read" in stderr and "skip-bad-images" not in stderr
    two = launch_predict(*args, "--output", str(tmp_path / "two.jsonl"), "--strict")
    # --strict: the main rank exits 3 after writing every row; accelerate launch reports a failed worker as 1
    assert two.returncode == 1 and "exitcode  : 3" in two.stderr, two.stderr[-3000:]
    assert "1 of 13 files could not be read" in two.stderr

    rows_one = list(csv.DictReader(open(tmp_path / "one.csv")))
    rows_two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert [r["path"] for r in rows_one] == [r["path"] for r in rows_two] == expected
    for a, b in zip(rows_one, rows_two):
        assert a["label"] == (b["label"] or "") and a["label_2"] == (b["top_k"][1]["label"] if b["top_k"] else "")
        if b["error"] is None:
            assert math.isclose(float(a["probability"]), b["probability"], abs_tol=1e-5) and a["error"] == ""
        else:
            assert b["path"].endswith("zz_notes.jpg") and a["error"] == b["error"] and "cannot identify" in a["error"]
    assert sum(r["error"] is not None for r in rows_two) == 1
