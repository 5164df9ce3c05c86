"""Launched as 2 processes by test_distributed_ranks.py: a dry run's data decisions when rank 1 alone cannot
read some files (a transient error), twice; each rank writes what it drew and decided (train/val lists,
duplicates, summary) to rank{R}_{part}.json.

    python scan_worker.py flaky_scans DATA_ROOT OUT_DIR

Parts: scan (the bad-image scan under a 5-second process-group timeout, kept for the whole run: the
reader checks one file at a time, each taking ``SECONDS_PER_FILE``, so one process scanning every file
takes longer than the timeout; train/green_0.png and green_1.png fail on rank 1), then split (no val
folder: each process draws the val split by content hashes before the ranks meet, and
train/red/red_copy.png, a copy of red_0.png, fails on rank 1). The readers (the documented hook: a
source's or the data's ``reader``) keep no cache, as if each rank's node had its own cold one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import tiny_resnet  # noqa: F401  (registers the test backbone)

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.images import FileImages
from dist_finetune.run_records import dry_run
from dist_finetune.sources import read_folders

TIMEOUT_S = 5.0
SECONDS_PER_FILE = 0.2


class FlakyImages(FileImages):
    """File paths, checked one at a time (each taking ``seconds``); rank 1 cannot read ``flaky`` (train) files."""

    def __init__(self, rank: int, flaky: tuple[str, ...], seconds: float = 0.0):
        super().__init__(root=None)  # no cache: every rank scans whatever it is given
        self.rank, self.flaky, self.seconds, self.one_at_a_time = rank, flaky, seconds, threading.Lock()

    def check(self, item: str):
        with self.one_at_a_time:
            time.sleep(self.seconds)
        if self.rank == 1 and Path(item).name in self.flaky and Path(item).parent.parent.name == "train":
            return "simulated transient read error", None
        return super().check(item)


def wait_for_every_rank(out: Path, rank: int, world_size: int) -> None:
    """Start the process group within moments on both ranks: its 5 s timeout also bounds the rendezvous."""
    (out / f"ready{rank}").touch()
    deadline = time.monotonic() + 300
    while not all((out / f"ready{r}").exists() for r in range(world_size)):
        if time.monotonic() > deadline:
            raise SystemExit("the other rank never started")
        time.sleep(0.02)


def dry_run_and_record(data: ImageClassificationData, out: Path, part: str, rank: int) -> None:
    drawn = {"train": list(data.train_paths), "val": list(data.val_paths)}
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone="tiny_resnet", pretrained=False)
    trainer = Trainer(max_epochs=1, progress_bar=False, process_group_timeout_s=TIMEOUT_S, channels_last=False)
    dry_run(trainer, task, data, "no_freeze")
    decided = {"train": data.train_paths, "val": data.val_paths, "duplicates": data.duplicates,
               "summary": data.summary}
    (out / f"rank{rank}_{part}.json").write_text(json.dumps({"drawn": drawn, "decided": decided}))


def main() -> None:
    scenario, data_root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if scenario != "flaky_scans":
        raise SystemExit(f"unknown scenario {scenario}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    settings = dict(image_size=32, batch_size=2, num_workers=0, skip_bad_images=True, dedupe=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), **settings)
    data.reader = FlakyImages(rank, ("green_0.png", "green_1.png"), SECONDS_PER_FILE)  # adjacent: one per share
    assert len(data.train_paths + data.val_paths) * SECONDS_PER_FILE > TIMEOUT_S + 1, "one rank alone is too slow"
    wait_for_every_rank(out, rank, world_size)
    dry_run_and_record(data, out, "scan", rank)
    source = read_folders(str(data_root / "train"), None)
    source.reader = FlakyImages(rank, ("red_copy.png",))
    dry_run_and_record(ImageClassificationData.from_source(source, val_split=0.5, seed=0, **settings), out,
                       "split", rank)


if __name__ == "__main__":
    main()
