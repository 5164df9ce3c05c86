"""`dist-finetune evaluate` over two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import free_port
from test_reports import evaluate_args, one_process_report, saved_model  # noqa: F401  (the fixtures)


ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
ENV.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_evaluate_with_two_processes_counts_every_image_once(saved_model, one_process_report, tmp_path):
    out = tmp_path / "eval2"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "dist_finetune", *evaluate_args(*saved_model, out)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report written:") == 1  # printed and written by the main process only
    one = json.loads((one_process_report / "report.json").read_text())
    two = json.loads((out / "report.json").read_text())
    assert two["num_images"] == 9
    for key in ("confusion_matrix", "per_class", "accuracy", "most_confused", "macro_avg", "weighted_avg"):
        assert two[key] == one[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert [row["path"] for row in two["top_losses"]] == [row["path"] for row in one["top_losses"]]
