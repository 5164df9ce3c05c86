"""Deliberate breakages the test suite must catch (not a test module: pytest does not collect this file).

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py dedupe ... # only those named

Each mutation replaces one exact piece of text in one file of a temporary copy of the repository (never
the working tree) and runs ``python -m pytest -x -q SELECTION`` there, with PYTHONPATH pointing at the
copy. A mutation is caught when that run fails. Exits non-zero if any mutation survives or if its old
text no longer occurs exactly once (the code moved: update the entry). See tests/README.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # a selection still running after this is counted as caught: its own timeouts fail it later


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    selection: tuple[str, ...]  # pytest arguments that must fail with the mutation in place


MUTATIONS = [
    Mutation("dedupe keeps the last copy, not the first", "dist_finetune/splits.py",
             "            if position:\n                (from_train",
             "            if position != len(group) - 1:\n                (from_train",
             ("tests/test_splits.py", "-k", "dedupe")),
    Mutation("class weights not applied to the loss", "dist_finetune/trainer.py",
             "loss = training_loss(logits.float(), targets, class_weights, config.label_smoothing)",
             "loss = training_loss(logits.float(), targets, None, config.label_smoothing)",
             ("tests/test_splits.py", "-k", "class_weights")),
    Mutation("early stopping decided on rank 0 only", "dist_finetune/model_selection.py",
             "if any_rank(run.accelerator, self.waited >= self.patience):",
             "if run.accelerator.is_main_process and self.waited >= self.patience:",
             ("tests/integration/test_distributed_ranks.py", "-k", "early_stopping")),
    Mutation("DDP not rebuilt after an unfreeze", "dist_finetune/trainer.py",
             "                    run.model = resync()",
             "                    run.model = run.model",
             ("tests/integration/test_distributed_ranks.py", "-k", "ranks_bit_identical")),
    Mutation("DDP not rebuilt after an unfreeze, 2-process resume at the unfreeze", "dist_finetune/trainer.py",
             "                    run.model = resync()",
             "                    run.model = run.model",
             ("tests/integration/test_resume_killed.py", "-k", "killed_preempted_and_killed_again")),
    Mutation("resume replays one strategy epoch too many", "dist_finetune/finetuning.py",
             'for epoch in range(state.get("epochs_applied", 0)):',
             'for epoch in range(state.get("epochs_applied", 0) + 1):',
             ("tests/integration/test_resume_killed.py", "-k", "killed_preempted_and_killed_again")),
    Mutation("newly added param groups skip the lr ramp", "dist_finetune/schedule.py",
             "if joined is None or not self.new_group_warmup_steps:",
             "if True:",
             ("tests/test_model_selection.py", "-k", "ramp")),
    Mutation("BatchNorm buffers not broadcast from rank 0", "dist_finetune/distributed.py",
             "    for buffer in model.buffers():\n        broadcast(buffer.data, from_process=0)",
             "    for buffer in []:\n        broadcast(buffer.data, from_process=0)",
             ("tests/integration/test_distributed_ranks.py", "-k", "ranks_bit_identical")),
    Mutation("scan cache never invalidated", "dist_finetune/images.py",
             "if i in cache and len(cache[i]) >= 3 and cache[i][:-2] == stamps[i]}",
             "if i in cache and len(cache[i]) >= 3}",
             ("tests/test_images.py", "-k", "invalidated")),
    Mutation("best model: a tie replaces the earlier epoch", "dist_finetune/model_selection.py",
             "if score(candidate, self.metric) <= best:",
             "if score(candidate, self.metric) < best:",
             ("tests/test_model_selection.py", "-k", "exact_tie")),
    Mutation("resume ignores a changed lr", "dist_finetune/resume.py",
             "group[key] = group[key] * new / old if old else new",
             "group[key] = group[key]",
             ("tests/test_resume.py", "-k", "changed_lr")),
    Mutation("fp16 guard needs every rank to lose the step", "dist_finetune/loss_guard.py",
             "lost_window = self._steps >= self.check_every_n_steps and all(recent)",
             "lost_window = self._steps >= self.check_every_n_steps and all(r >= self.accelerator.num_processes "
             "for r in recent)",
             ("tests/test_loss_guard.py", "-k", "fp16")),
]


def run_one(copy: Path, mutation: Mutation) -> tuple[str, float]:
    """('caught' | 'NOT CAUGHT' | 'OLD TEXT MISSING', seconds) with ``mutation`` applied in ``copy``."""
    target = copy / mutation.path
    original = target.read_text()
    if original.count(mutation.old) != 1:
        return "OLD TEXT MISSING", 0.0
    target.write_text(original.replace(mutation.old, mutation.new))
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutation.selection], cwd=copy, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S)
        verdict = {0: "NOT CAUGHT", 5: "NOTHING SELECTED"}.get(result.returncode, "caught")
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        target.write_text(original)
    return verdict, time.monotonic() - start


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or any(n in m.name for n in names)]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as temporary:
        copy = Path(temporary) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache",
                                                                  "*.egg-info"))
        print(f"| mutation | file | selection | result | seconds |\n|---|---|---|---|---|", flush=True)
        for mutation in chosen:
            verdict, seconds = run_one(copy, mutation)
            failures += not verdict.startswith("caught")
            print(f"| {mutation.name} | {mutation.path} | `{' '.join(mutation.selection)}` | {verdict} | "
                  f"{seconds:.0f} |", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} caught", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
