"""Training curves of a run folder (losses, accuracy and every param group's learning rate), and the lr
finder's loss-against-lr curve.

Reads ``metrics.jsonl`` (one record per finished epoch) and, when present, ``steps.jsonl`` (one
record every few optimizer steps). A run may still be going or have been preempted and resumed, so
reading tolerates a partial last line and steps written twice. Imports only ``evaluation``'s
atomic writer from ``dist_finetune`` (no torch); matplotlib is optional and imported only to draw.
"""

from __future__ import annotations

import io
from pathlib import Path

from .run_files import read_jsonl, write_atomic

METRICS_FILENAME = "metrics.jsonl"
STEPS_FILENAME = "steps.jsonl"
CURVES_FILENAME = "curves.png"
MATPLOTLIB_HINT = "matplotlib is not installed: pip install 'dist_finetune[plots]' to get PNG plots"


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


def matplotlib_available() -> bool:
    """Whether PNG plots can be drawn (matplotlib is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_run(run_dir) -> dict:
    """``{"epochs": [...], "steps": [...]}`` of a run folder, each sorted and one record per number.

    Lines that do not parse are skipped (a run killed mid-write ends in a partial line). A resumed
    run writes its steps again from the checkpoint on, so the last record of each step (or epoch)
    number wins.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILENAME
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} not found: {run_dir} is not a dist_finetune run folder, "
            "or its run has not finished an epoch yet"
        )
    steps = run_dir / STEPS_FILENAME
    return {
        "epochs": _last_per_number(read_jsonl(metrics), "epoch"),
        "steps": _last_per_number(read_jsonl(steps), "step") if steps.is_file() else [],
    }


def _last_per_number(records: list[dict], key: str) -> list[dict]:
    """Keep the last record of each ``key`` value, sorted by it; records without it are dropped."""
    last = {record[key]: record for record in records if isinstance(record.get(key), int)}
    return [last[number] for number in sorted(last)]


def plot_curves(run_dir, output=None) -> Path:
    """Draw ``curves.png`` (default: in the run folder) and return its path.

    Panels: train/val loss, val accuracy (top-5 too when logged), and the lr of every param group
    per step (per epoch when the run has no steps.jsonl), log scale; with a weight average
    (``--ema-decay``) its validation too. Dashed lines mark unfreeze points, the boundary before an
    epoch that added param groups; a star marks the chosen best epoch (the last record with
    ``best: true``), on the average's curve when it was the one kept. Raises PlotsUnavailable without matplotlib.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    epochs, steps = run["epochs"], run["steps"]
    unfreezes = [record["epoch"] for record in epochs if record.get("joined")]
    best = next((record for record in reversed(epochs) if record.get("best")), None)

    figure = _new_figure((16, 4.8))
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3)
    figure.suptitle(run_dir.resolve().name)

    _plot_key(loss_axes, epochs, "train_loss", "train loss")
    _plot_key(loss_axes, epochs, "val_loss", "val loss")
    _plot_key(accuracy_axes, epochs, "val_acc", "val accuracy")
    _plot_key(accuracy_axes, epochs, "val_top5", "val top-5 accuracy")
    _plot_key(loss_axes, epochs, "val_loss_ema", "val loss, weight average")  # --ema-decay
    _plot_key(accuracy_axes, epochs, "val_acc_ema", "val accuracy, weight average")
    if best is not None:
        kept = "_ema" if best.get("best_weights") == "ema" else ""  # the best model is the weight average
        _mark_best(loss_axes, best, "val_loss" + kept)
        _mark_best(accuracy_axes, best, "val_acc" + kept)
    loss_axes.set(title="loss", xlabel="epoch")
    accuracy_axes.set(title="validation accuracy", xlabel="epoch")
    for axes in (loss_axes, accuracy_axes):
        _mark_unfreezes(axes, [epoch - 0.5 for epoch in unfreezes])

    if steps:
        first_step = {}
        for record in steps:
            first_step.setdefault(record.get("epoch"), record["step"])
        _plot_lrs(lr_axes, steps, "step")
        known = [epoch for epoch in unfreezes if epoch in first_step]
        _mark_unfreezes(lr_axes, [first_step[epoch] for epoch in known])
        for epoch in known:
            lr_axes.annotate(f"epoch {epoch}", (first_step[epoch], 1), xycoords=("data", "axes fraction"),
                             xytext=(-3, -4), textcoords="offset points", rotation=90, ha="right", va="top",
                             fontsize=8, color="grey")
        lr_axes.set(title="learning rate per step", xlabel="optimizer step")
    else:
        _plot_lrs(lr_axes, epochs, "epoch")
        _mark_unfreezes(lr_axes, [epoch - 0.5 for epoch in unfreezes])
        lr_axes.set(title="learning rate per epoch (end of epoch)", xlabel="epoch")
    if any(lr > 0 for record in steps or epochs for lr in record.get("lr") or []):
        lr_axes.set_yscale("log", nonpositive="mask")  # a schedule ending at exactly 0 is left off

    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return _write_png(figure, Path(output) if output is not None else run_dir / CURVES_FILENAME)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float | None,
                 output) -> Path:
    """Draw the lr finder's loss (raw and smoothed) against the lr, log x, the suggested lr marked; write
    ``output`` (PNG) and return it. Raises PlotsUnavailable without matplotlib."""
    figure = _new_figure((7, 4.8))
    axes = figure.subplots()
    axes.plot(lrs, losses, color="lightgrey", label="loss")
    axes.plot(lrs, smoothed, label="smoothed loss")
    if suggestion is not None:
        axes.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    axes.set_xscale("log")
    low, high = min(losses + smoothed), max(smoothed)  # the raw spikes past divergence would flatten the rest
    axes.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
    axes.set(title="lr finder", xlabel="learning rate (head)", ylabel="training loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _write_png(figure, Path(output))


def _new_figure(size: tuple[float, float]):
    """A matplotlib Figure (the Figure API renders with Agg and leaves pyplot's global state and any GUI
    backend alone); raises PlotsUnavailable without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise PlotsUnavailable(MATPLOTLIB_HINT) from error
    return Figure(figsize=size, layout="constrained")


def _write_png(figure, output: Path) -> Path:
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    write_atomic(output, png.getvalue())
    return output


def _plot_key(axes, records: list[dict], key: str, label: str) -> None:
    points = [(record["epoch"], record[key]) for record in records if record.get(key) is not None]
    if points:
        axes.plot(*zip(*points), marker="o", markersize=3, label=label)


def _mark_best(axes, best: dict, key: str) -> None:
    if best.get(key) is None:
        return
    axes.plot(best["epoch"], best[key], marker="*", markersize=14, color="gold", markeredgecolor="black",
              linestyle="none", label=f"best (epoch {best['epoch']})", zorder=3)
    axes.annotate(f"{best[key]:.3g}", (best["epoch"], best[key]), textcoords="offset points", xytext=(6, 6),
                  fontsize=8)


def _plot_lrs(axes, records: list[dict], x_key: str) -> None:
    """One line per param group; later groups only exist from the step (epoch) that added them."""
    groups = max((len(record.get("lr") or []) for record in records), default=0)
    for group in range(groups):
        points = [(record[x_key], record["lr"][group]) for record in records if len(record.get("lr") or []) > group]
        label = "group 0 (head)" if group == 0 else f"group {group}"
        # Groups added later often share one lr (head's / 10): thinner, dashed lines keep both visible.
        axes.plot(*zip(*points), label=label, marker="o" if x_key == "epoch" else None, markersize=3,
                  linewidth=max(1.0, 3.0 - 0.8 * group), linestyle=("-", "--", ":", "-.")[group % 4])


def _mark_unfreezes(axes, positions: list[float]) -> None:
    for number, x in enumerate(positions):
        axes.axvline(x, color="grey", linestyle="--", linewidth=1, label="unfreeze" if number == 0 else None)
