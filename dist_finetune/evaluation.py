"""The numbers of an evaluation report: per-class metrics, confusion matrix, worst images.

The report is plain data (a JSON-serialisable dict) built from labels and logits that the caller
has already gathered over processes, so it can be printed, saved and compared between runs.
No torch and nothing of ours but ``run_files``; matplotlib only when a PNG is asked for.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .run_files import write_atomic

TABLE_CLASSES = 30  # above this many classes, the printed report and the PNG show the worst classes only
WORST_CLASSES = 10  # classes in the printed report's table above TABLE_CLASSES
PNG_CLASSES = 25  # classes in confusion_matrix.png above TABLE_CLASSES


def build_report(labels, logits, class_names, paths=None, top_losses: int = 10, most_confused: int = 10) -> dict:
    """Every number of the report from ``labels`` [N] and raw ``logits`` [N, C] (tensors or arrays).

    Probabilities and per-sample cross-entropy are computed here in float64, so the report does not
    depend on the training's precision. Zero-division convention (sklearn's ``zero_division=0``):
    the precision of a class never predicted, the recall of a class with no image, and the F1 of a
    class whose precision and recall are both 0 are all 0.0. Averages run over every class.
    """
    labels = _as_numpy(labels, np.int64)
    logits = _as_numpy(logits, np.float64)
    class_names = [str(name) for name in class_names]
    _check_inputs(labels, logits, class_names, paths)
    count, num_classes = logits.shape

    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = -log_probs[np.arange(count), labels]
    predictions = logits.argmax(axis=1)
    confusion = np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, -1)

    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=precision + recall > 0)

    report = {
        "num_images": int(count),
        "num_classes": int(num_classes),
        "classes": class_names,
        "accuracy": float(hits.sum() / count),
    }
    if num_classes > 5:
        # The label's rank among the logits; ties go to the lower class index, as argmax does for
        # top-1. Counting is linear in C, a full sort of every row is not.
        label_logits = logits[np.arange(count), labels][:, None]
        rank = (logits > label_logits).sum(axis=1)
        rank += ((logits == label_logits) & (np.arange(num_classes) < labels[:, None])).sum(axis=1)
        report["top5_accuracy"] = float((rank < 5).mean())
    report["loss"] = float(losses.mean())
    report["per_class"] = [
        {"class": name, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
         "support": int(support[i]), "predicted": int(predicted[i])}
        for i, name in enumerate(class_names)
    ]
    metrics = {"precision": precision, "recall": recall, "f1": f1}
    report["macro_avg"] = {key: float(values.mean()) for key, values in metrics.items()}
    report["weighted_avg"] = {key: float((values * support).sum() / count) for key, values in metrics.items()}
    report["confusion_matrix"] = confusion.tolist()
    report["most_confused"] = _most_confused(confusion, class_names, most_confused)
    report["top_losses"] = _top_losses(losses, log_probs, labels, predictions, class_names, paths, top_losses)
    return report


def _as_numpy(values, dtype) -> np.ndarray:
    """Accept torch tensors on any device and in any dtype (bf16 included), arrays and lists."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        values = (values.double() if dtype == np.float64 else values.long()).numpy()
    return np.asarray(values, dtype=dtype)


def _check_inputs(labels, logits, class_names, paths) -> None:
    """Fail on inputs that would give silently wrong numbers, naming what does not fit."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [N] and logits [N, C]; got {labels.shape} and {logits.shape}")
    if logits.shape[0] == 0:
        raise ValueError("no images to evaluate")
    if len(class_names) != logits.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {logits.shape[1]} logits per image")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}; got {labels.min()}..{labels.max()}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity")
    if paths is not None and len(paths) != logits.shape[0]:
        raise ValueError(f"{len(paths)} paths for {logits.shape[0]} images")


def _most_confused(confusion: np.ndarray, class_names: list[str], limit: int) -> list[dict]:
    """Off-diagonal cells by count (highest first), then by true and predicted class index."""
    off_diagonal = confusion * (1 - np.eye(len(class_names), dtype=confusion.dtype))
    true, predicted = np.nonzero(off_diagonal)  # row-major: already by true, then predicted index
    counts = off_diagonal[true, predicted]
    return [{"true": class_names[true[i]], "predicted": class_names[predicted[i]], "count": int(counts[i])}
            for i in np.argsort(-counts, kind="stable")[:limit]]


def _top_losses(losses, log_probs, labels, predictions, class_names, paths, limit: int) -> list[dict]:
    """The highest-loss images first; a stable sort keeps equal losses in input order."""
    rows = []
    for i in np.argsort(-losses, kind="stable")[:limit]:
        row = {"path": str(paths[i])} if paths is not None else {"index": int(i)}
        row.update(true=class_names[labels[i]], predicted=class_names[predictions[i]],
                   probability=float(np.exp(log_probs[i, predictions[i]])), loss=float(losses[i]))
        rows.append(row)
    return rows


def format_report(report: dict) -> str:
    """A readable table like sklearn's classification_report, then the most-confused pairs. Above
    TABLE_CLASSES classes the table holds the WORST_CLASSES classes of lowest F1 (report.json has all)."""
    rows = report["per_class"]
    lines = []
    if len(rows) > TABLE_CLASSES:
        rows = sorted(rows, key=lambda row: (row["f1"], row["recall"]))[:WORST_CLASSES]
        lines.append(f"the {len(rows)} worst of {len(report['classes'])} classes by F1 (every class: report.json, "
                     "confusion_matrix.csv):")
    width = max(len("top-5 accuracy"), *(len(row["class"]) for row in rows))
    lines.append(f"{'':<{width}}  precision  recall  f1-score  support  predicted")
    for row in rows:
        lines.append(f"{row['class']:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>8.3f}"
                     f"  {row['support']:>7d}  {row['predicted']:>9d}")
    lines.append("")
    for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        avg = report[key]
        lines.append(f"{name:<{width}}  {avg['precision']:>9.3f}  {avg['recall']:>6.3f}  {avg['f1']:>8.3f}"
                     f"  {report['num_images']:>7d}")
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {report['accuracy']:>8.3f}  {report['num_images']:>7d}")
    if "top5_accuracy" in report:
        lines.append(f"{'top-5 accuracy':<{width}}  {'':>9}  {'':>6}  {report['top5_accuracy']:>8.3f}")
    lines.append(f"{'loss':<{width}}  {'':>9}  {'':>6}  {report['loss']:>8.4f}")
    if report["most_confused"]:
        lines += ["", "most confused (true -> predicted: images):"]
        lines += [f"  {c['true']} -> {c['predicted']}: {c['count']}" for c in report["most_confused"]]
    if report["top_losses"]:
        lines += ["", "highest-loss images (loss, true -> predicted (probability)):"]
        lines += [f"  {row['loss']:.3f}  {row.get('path', row.get('index'))}: {row['true']} -> {row['predicted']} "
                  f"({row['probability']:.2f})" for row in report["top_losses"]]
    return "\n".join(lines)


def write_report(report: dict, output_dir) -> list[Path]:
    """Write report.json, confusion_matrix.csv and, when matplotlib is installed, confusion_matrix.png.

    Returns the paths written: without matplotlib the PNG is simply absent (the caller decides what
    to say). Every file is written under a temporary name and renamed, so none is ever half-written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "report.json", output_dir / "confusion_matrix.csv"]
    write_atomic(written[0], (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(written[1], _confusion_csv(report).encode())
    png = _confusion_png(report)
    if png is not None:
        written.append(output_dir / "confusion_matrix.png")
        write_atomic(written[2], png)
    return written


def _confusion_csv(report: dict) -> str:
    """Header ``true\\predicted,<classes>``, then one row per true class, its name first."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true\\predicted", *report["classes"]])
    writer.writerows([name, *row] for name, row in zip(report["classes"], report["confusion_matrix"]))
    return text.getvalue()


def png_classes(report: dict) -> list[int]:
    """The classes confusion_matrix.png shows: all up to TABLE_CLASSES, else the PNG_CLASSES most involved in
    errors (the most confused pairs' classes, then the lowest recall), in class order."""
    names = report["classes"]
    if len(names) <= TABLE_CLASSES:
        return list(range(len(names)))
    index = {name: i for i, name in enumerate(names)}
    chosen = list(dict.fromkeys(index[pair[key]] for pair in report["most_confused"] for key in ("true", "predicted")))
    by_recall = sorted(range(len(names)), key=lambda i: (report["per_class"][i]["recall"], i))
    chosen += [i for i in by_recall if i not in chosen]
    return sorted(chosen[:PNG_CLASSES])


def _confusion_png(report: dict) -> bytes | None:
    """Counts and row percentages in every cell, coloured by row percentage; None without matplotlib. Above
    TABLE_CLASSES classes, the rows and columns of :func:`png_classes` only (shares of the whole row).

    The Figure API renders with Agg and leaves pyplot's global state (and any GUI backend) alone.
    """
    try:
        import matplotlib  # noqa: F401  (first, so that a missing matplotlib fails here)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    shown = png_classes(report)
    full = np.array(report["confusion_matrix"])
    names, counts = [report["classes"][i] for i in shown], full[np.ix_(shown, shown)]
    size = len(names)
    rows = full.sum(axis=1)[shown][:, None]
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = min(3.0 + 0.7 * size, 40.0)  # 0.7 inch per cell up to 52 classes, then smaller cells
    font = max(4.0, min(10.0, 14.0 * (side - 3.0) / size))
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    for t in range(size):
        for p in range(size):
            if counts[t, p]:
                axes.text(p, t, f"{counts[t, p]}\n{shares[t, p]:.0%}", ha="center", va="center", fontsize=font,
                          color="white" if shares[t, p] > 0.5 else "black")
            else:
                axes.text(p, t, "0", ha="center", va="center", fontsize=font, color="0.6")
    rotate = max(len(name) for name in names) > 6  # wider than a cell at this font size
    axes.set_xticks(range(size), names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                    rotation_mode="anchor", fontsize=font)
    axes.set_yticks(range(size), names, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    part = "" if size == len(full) else f"; the {size} classes most involved in errors of {len(full)}"
    axes.set_title(f"accuracy {report['accuracy']:.3f} ({report['num_images']} images{part})")
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return png.getvalue()
