"""``accuracy --tta``: (a)'s kept model scored again by ``dist-finetune evaluate``, without and with ``--tta flip``.

Both scores come from the same CLI on the same model file and val images, so their difference is the
test-time augmentation's alone; the one without it checks that evaluate agrees with the run's own val_acc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TTA_KEYS = (("eval_acc", "none"), ("tta_acc", "flip"))


def evaluate_kept_model(run: dict, data: Path, env: dict, cwd: Path) -> None:
    """Add ``eval_acc`` and ``tta_acc`` (accuracy of the run's model.safetensors on ``data/val``) to ``run``."""
    model = Path(run["output_dir"]) / "model.safetensors"
    if run.get("status") != "ok" or not model.is_file():
        return
    for key, tta in TTA_KEYS:
        out = Path(run["output_dir"]) / f"evaluate-tta-{tta}"
        cmd = [sys.executable, "-m", "dist_finetune", "evaluate", "--checkpoint", str(model), "--data-folder",
               str(data / "val"), "--output-dir", str(out), "--tta", tta]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        report = out / "report.json"
        run[key] = json.loads(report.read_text())["accuracy"] if proc.returncode == 0 and report.is_file() else None
        if run[key] is None:
            print(f"  evaluate --tta {tta} FAILED:\n" + "\n".join(proc.stderr.splitlines()[-10:]), flush=True)
    print(f"  kept model through evaluate: {run['eval_acc']} without TTA, {run['tta_acc']} with --tta flip", flush=True)


def tta_summary(runs: list[dict]) -> tuple[dict, str]:
    """Means without and with TTA over the (a) runs that have both, and TTA's wins/ties/losses run by run."""
    pairs = [(r["eval_acc"], r["tta_acc"]) for r in runs
             if r["method"] == "a" and r.get("eval_acc") is not None and r.get("tta_acc") is not None]
    diffs = [tta - plain for plain, tta in pairs]
    summary = {"pairs": len(pairs), "eval_acc_mean": sum(p for p, _ in pairs) / len(pairs) if pairs else None,
               "tta_acc_mean": sum(t for _, t in pairs) / len(pairs) if pairs else None,
               "wins": sum(d > 1e-9 for d in diffs), "ties": sum(abs(d) <= 1e-9 for d in diffs),
               "losses": sum(d < -1e-9 for d in diffs)}
    if not pairs:
        return summary, "(a) kept model with --tta flip: no run to compare"
    line = ("(a) kept model through evaluate, {pairs} runs: {eval_acc_mean:.3f} without TTA, {tta_acc_mean:.3f} with "
            "--tta flip; TTA {wins} ahead, {ties} level, {losses} behind").format(**summary)
    return summary, line
