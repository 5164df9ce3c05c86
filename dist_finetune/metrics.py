"""Per-epoch metrics: kept in memory, printed on the main process, appended to ``metrics.jsonl``.

One JSON line per finished epoch, written as soon as the epoch ends, so a crash or a preemption
never loses the epochs before it; a resumed run keeps the lines of the epochs it does not redo.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILENAME = "metrics.jsonl"


class MetricsLog:
    """The epochs' records; writes to ``output_dir/metrics.jsonl`` when an output dir is set."""

    def __init__(self, output_dir: str | None, is_main_process: bool, keep_epochs_before: int = 0):
        """Start the file afresh, keeping (on resume) the lines of the epochs finished before."""
        self.path = Path(output_dir) / METRICS_FILENAME if output_dir else None
        self.is_main_process = is_main_process
        self.records: list[dict] = []
        if self.path is None:
            return
        lines = self.path.read_text().splitlines() if keep_epochs_before and self.path.is_file() else []
        self.records = [r for r in map(json.loads, lines) if r["epoch"] < keep_epochs_before]
        if is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.is_main_process:
            return
        lrs = ", ".join(f"{lr:.2e}" for lr in record["lr"])
        top5 = f" top5 {record['val_top5']:.3f}" if "val_top5" in record else ""
        tqdm.write(
            f"epoch {record['epoch']}: train_loss {record['train_loss']:.4f}  val_loss {record['val_loss']:.4f}  "
            f"val_acc {record['val_acc']:.3f}{top5}  {record['images_per_s']:.1f} img/s  lr [{lrs}]"
        )
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
