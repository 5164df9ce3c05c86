"""Training without the up-front image scan (``scan=False``, ``--no-scan``): an image that fails to load
is replaced by the next readable one in the list (the same replacement on every run and rank), named on
stderr by the process that met it, and counted over every rank and loader worker at the end of training.

Loader workers are separate processes, so each appends what it met to its own file in a folder this
object owns (removed with it); the count reads them all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

from .callbacks import Callback, RunState
from .distributed import merged_over_ranks

SHOWN = 10  # unreadable images named in the end-of-training line


class LoadFailures:
    """Where the processes of one data object record the images they could not load."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="dist_finetune_unreadable_")
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def record(self, item: str, problem: str, replacement: str) -> None:
        print(f"warning: cannot read image {item} ({problem}); trained on {replacement} in its place "
              "(--no-scan)", file=sys.stderr, flush=True)
        with open(Path(self.folder) / f"{os.getpid()}.jsonl", "a") as log:
            log.write(json.dumps([item, problem]) + "\n")  # one short append: never interleaved

    def read(self) -> dict[str, str]:
        """{item: problem} of every image this process and its workers failed to load so far."""
        failures = {}
        for log in sorted(Path(self.folder).glob("*.jsonl")):
            for line in log.read_text().splitlines():
                item, problem = json.loads(line)
                failures[item] = problem
        return failures


class LoadFailureReport(Callback):
    """At the end of training: how many images failed to load and were replaced, over all ranks."""

    def on_fit_end(self, trainer, run: RunState) -> None:
        failures = run.data.load_failures
        if failures is None:
            return
        merged = merged_over_ranks(run.accelerator, failures.read())
        if merged:
            named = ", ".join(f"{item} ({problem})" for item, problem in sorted(merged.items())[:SHOWN])
            more = f", ... and {len(merged) - SHOWN} more" if len(merged) > SHOWN else ""
            trainer.announce(f"warning: {len(merged)} image(s) could not be read during training and were "
                             f"replaced by the next readable image (--no-scan): {named}{more}")
