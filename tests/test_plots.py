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


def drawn_figures(monkeypatch) -> list:
    """Every matplotlib Figure plot_curves saves, kept for inspection."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure) or save(
        figure, *args, **kwargs))
    return figures


def lines(axes) -> dict[str, list[tuple[float, float]]]:
    """The axes' labelled lines as {label: [(x, y), ...]}."""
    return {line.get_label(): [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
            for line in axes.get_lines() if not line.get_label().startswith("_")}


def test_plot_curves_draws_every_curve_and_marker(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from PIL import Image

    assert matplotlib_available()
    figures = drawn_figures(monkeypatch)
    path = plot_curves(run_dir)
    assert path == run_dir / "curves.png"
    loss, accuracy, lr = figures[0].axes
    unfreeze_at_epoch_1 = [(0.5, 0.0), (0.5, 1.0)]  # dashed line between epochs 0 and 1 (x in data, y in axes)
    assert lines(loss) == {"train loss": [(0, 1.2), (1, 0.9), (2, 0.7)], "val loss": [(0, 1.0), (1, 0.8), (2, 0.9)],
                           "best (epoch 1)": [(1, 0.8)], "unfreeze": unfreeze_at_epoch_1}
    assert lines(accuracy) == {"val accuracy": [(0, 0.5), (1, 0.7), (2, 0.6)], "best (epoch 1)": [(1, 0.7)],
                               "unfreeze": unfreeze_at_epoch_1}
    assert lines(lr) == {"group 0 (head)": [(n, pytest.approx(1e-3 / n)) for n in range(1, 7)],
                         "group 1": [(n, pytest.approx(1e-4 / n)) for n in range(3, 7)],
                         "unfreeze": [(3, 0.0), (3, 1.0)]}  # at epoch 1's first step
    assert lr.get_yscale() == "log"
    with Image.open(path) as image:  # the PNG is that figure: 16 x 4.8 inches at 100 dpi, with something drawn
        assert image.format == "PNG" and image.size == (1600, 480)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50 and max(count for count, _ in colours) < 0.95 * 1600 * 480

    (run_dir / "steps.jsonl").unlink()  # an old run: lr per epoch from metrics.jsonl
    elsewhere = plot_curves(run_dir, output=tmp_path / "old.png")
    assert elsewhere == tmp_path / "old.png"
    assert lines(figures[1].axes[2]) == {"group 0 (head)": [(0, 1e-3), (1, 8e-4), (2, 3e-4)],
                                         "group 1": [(1, 8e-5), (2, 3e-5)], "unfreeze": unfreeze_at_epoch_1}
    with Image.open(elsewhere) as image:
        assert image.size == (1600, 480)
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
