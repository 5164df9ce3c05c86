"""Training curves: reading a run folder that was preempted and resumed, and drawing it."""

from __future__ import annotations

import json
import sys

import pytest

from dist_finetune.plots import MATPLOTLIB_HINT, PlotsUnavailable, matplotlib_available, plot_curves, read_run

EPOCHS = [
    {"epoch": 0, "train_loss": 1.2, "val_loss": 1.0, "val_acc": 0.5, "lr": [1e-3], "best": True},
    {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_acc": 0.7, "lr": [8e-4, 8e-5], "best": True,
     "joined": [["layer4"]]},
    {"epoch": 2, "train_loss": 0.7, "val_loss": 0.9, "val_acc": 0.6, "lr": [3e-4, 3e-5]},
]


def step(number, epoch, loss):
    groups = 1 if epoch == 0 else 2
    return {"step": number, "epoch": epoch, "train_loss": loss, "lr": [1e-3 / number] + [1e-4 / number] * (groups - 1)}


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-a"
    run.mkdir()
    write_lines(run / "metrics.jsonl", EPOCHS, tail='{"epoch": 3, "train_lo')  # killed mid-write
    # Steps 1-4, preempted after step 4; resumed from the checkpoint at step 2, so 3-4 come again
    # (with other losses), then 5-6; the last line was cut off by a second kill.
    records = [step(1, 0, 1.5), step(2, 0, 1.3), step(3, 1, 9.0), step(4, 1, 9.0),
               step(3, 1, 1.1), step(4, 1, 1.0), step(5, 2, 0.8), step(6, 2, 0.7)]
    write_lines(run / "steps.jsonl", records, tail='{"step": 7, "epo')
    return run


def test_read_run_skips_partial_lines_and_keeps_last_steps(run_dir):
    run = read_run(run_dir)
    assert run["epochs"] == EPOCHS
    assert [record["step"] for record in run["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [record["train_loss"] for record in run["steps"]] == [1.5, 1.3, 1.1, 1.0, 0.8, 0.7]


def test_read_run_without_steps_file(run_dir):
    (run_dir / "steps.jsonl").unlink()
    assert read_run(run_dir)["steps"] == []


def test_missing_metrics_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found: .* is not a dist_finetune run folder"):
        read_run(tmp_path)


def test_plot_curves_writes_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    assert matplotlib_available()
    path = plot_curves(run_dir)
    assert path == run_dir / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run_dir / "steps.jsonl").unlink()  # an old run: lr per epoch from metrics.jsonl
    elsewhere = plot_curves(run_dir, output=tmp_path / "old.png")
    assert elsewhere == tmp_path / "old.png" and elsewhere.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run_dir.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary left


def test_without_matplotlib(run_dir, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib now raises ImportError
    assert not matplotlib_available()
    with pytest.raises(PlotsUnavailable) as raised:
        plot_curves(run_dir)
    assert str(raised.value) == MATPLOTLIB_HINT
    assert "pip install 'dist_finetune[plots]'" in MATPLOTLIB_HINT
    assert not (run_dir / "curves.png").exists()
