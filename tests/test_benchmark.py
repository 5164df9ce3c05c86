"""``scripts/benchmark.py --quick`` runs end to end: a smoke test of every job and the report, with no
assertion on any timing (those depend on the machine and its load). The end-to-end run uses timm's tiny
test_resnet at 32 px (what a smoke test needs, at a fraction of resnet18's cost); what --quick sets by
itself is checked on the parsed settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
ROWS = {"a_trainer_no_freeze", "a_default_malloc", "b_bare", "c_plain_accelerate", "decode", "p_predict", "s_freeze",
        "s_freeze_train_bn", "s_freeze_unfreeze", "f_cache", "f_no_cache"}


def test_quick_settings():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from benchmark import parse_args, resolve_defaults
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = parse_args(["--quick"])
    resolve_defaults(args, "cpu")
    assert (args.backbone, args.image_size, args.batch_size, args.num_images, args.num_val, args.num_large,
            args.timed_epochs) == ("resnet18", 64, 8, 32, 8, 4, 1)


@pytest.mark.slow  # seven fresh job processes
def test_benchmark_quick_runs_end_to_end(tmp_path):
    output = tmp_path / "benchmark.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--backbone", "timm:test_resnet", "--image-size",
                             "32", "--data-dir", str(tmp_path / "data"), "--output", str(output)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["results"]) == ROWS
    assert report["settings"]["quick"] is True and report["settings"]["image_size"] == 32
    trainer = report["results"]["a_trainer_no_freeze"]
    assert trainer["strategy"] == "no_freeze" and trainer["finetune_wall_s"] > 0
    assert report["results"]["f_cache"]["feature_cache_used"] is True
    assert report["results"]["f_no_cache"]["feature_cache_used"] is False
    assert {"a_over_b", "a_over_c", "a_over_default_malloc", "freeze_speedup", "decode"} <= set(report["summary"])
    assert report["results"]["a_default_malloc"]["strategy"] == "no_freeze"
    assert report["table"] in result.stdout and f"wrote {output}" in result.stdout
