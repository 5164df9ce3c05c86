"""Exact resume: a run killed (SIGKILL) or preempted (SIGUSR1) at any step ends bit-identical to an
uninterrupted one, also around the unfreeze transition, with 1 and 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import free_port
from test_distributed import ENV

from dist_finetune.errors import CheckpointError
from dist_finetune.preemption import PREEMPTED_EXIT_CODE

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS_PER_EPOCH = 6  # 24 training images, batch 4: the backbone unfreezes between steps 6 and 7


def run(data: Path, out: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    prefix = [sys.executable]
    if processes > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                  "--num_processes", str(processes), "--main_process_port", str(free_port()),
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*prefix, str(WORKER), str(data), str(out), *args], capture_output=True, text=True,
                          env=ENV, timeout=600)


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The last epoch's model and the best epoch's."""
    return {name: load_file(out / name) for name in ("last.safetensors", "model.safetensors")}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        different = [n for n in a[name] if not torch.equal(a[name][n], b[name][n])]
        assert not different, f"{name} differs in {different[:5]}"


@pytest.fixture(scope="module")
def baselines(image_folders, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, one per process count."""
    outs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"baseline{processes}")
        result = run(image_folders, out, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[processes] = out
    return outs


@pytest.mark.parametrize("processes, kill_at", [(1, 5), (1, 6), (1, 7), (2, 7)])
def test_sigkill_then_resume_is_bit_identical(image_folders, baselines, tmp_path, processes, kill_at):
    killed = run(image_folders, tmp_path, "--kill-at", str(kill_at), processes=processes)
    assert killed.returncode != 0 and not (tmp_path / "last.safetensors").exists()
    resumed = run(image_folders, tmp_path, "--resume", "latest", processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {kill_at - 1}" in resumed.stdout  # resumed from the last checkpoint before the kill
    assert_bit_identical(final_weights(tmp_path), final_weights(baselines[processes]))
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.parametrize("processes", [1, 2])
def test_sigusr1_saves_exits_42_and_resumes_exactly(image_folders, baselines, tmp_path, processes):
    stopped = run(image_folders, tmp_path, "--signal-at", "8", processes=processes)
    assert stopped.returncode in (PREEMPTED_EXIT_CODE, 1), stopped.stderr[-3000:]  # accelerate launch reports 1
    assert "stopped by SIGUSR1" in stopped.stderr
    assert (tmp_path / "checkpoints" / "step-00000008" / "manifest.json").is_file()
    resumed = run(image_folders, tmp_path, "--resume", "latest", processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(final_weights(tmp_path), final_weights(baselines[processes]))


def test_sigusr1_exit_code_is_42_in_one_process(image_folders, tmp_path):
    stopped = run(image_folders, tmp_path, "--signal-at", "2")
    assert stopped.returncode == PREEMPTED_EXIT_CODE


def test_corrupt_latest_checkpoint_falls_back_to_an_intact_one(image_folders, baselines, tmp_path):
    run(image_folders, tmp_path, "--kill-at", "9")
    newest = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated by a crash or a full disk
    (tmp_path / "checkpoints" / ".step-00000009.partial").mkdir()  # a write that never finished
    resumed = run(image_folders, tmp_path, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest} is corrupt" in resumed.stderr and "step 7" in resumed.stdout
    assert_bit_identical(final_weights(tmp_path), final_weights(baselines[1]))


def test_resume_latest_without_checkpoints_starts_fresh(image_folders, baselines, tmp_path):
    result = run(image_folders, tmp_path, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bit_identical(final_weights(tmp_path), final_weights(baselines[1]))


def test_resume_refuses_another_run(image_folders, tmp_path):
    run(image_folders, tmp_path, "--kill-at", "3")
    for args, message in ((["--backbone", "resnet18"], "backbone: checkpoint has 'tiny_resnet'"),
                          (["--strategy", "no_freeze"], "strategy: checkpoint has")):
        result = run(image_folders, tmp_path, "--resume", "latest", *args)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    fresh = run(image_folders, tmp_path)
    assert fresh.returncode != 0 and "already holds checkpoints" in fresh.stderr
    with pytest.raises(CheckpointError, match="incomplete"):
        from dist_finetune.training_state import find_checkpoint

        broken = tmp_path / "checkpoints" / "step-00000099"
        broken.mkdir()
        find_checkpoint(str(broken), None)
