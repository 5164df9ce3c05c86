"""Exact resume of killed processes: a run killed (SIGKILL) or preempted (SIGUSR1, SIGTERM) at any step ends
bit-identical to an uninterrupted one, also around the unfreeze transition, with 1 and 2 processes; another
process count resumes (not bit-exactly) or is refused; a damaged latest checkpoint falls back to an intact one."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_distributed_ranks import ENV

from dist_finetune.preemption import PREEMPTED_EXIT_CODE


WORKER = Path(__file__).with_name("resume_worker.py")


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


@pytest.fixture(scope="module")
def killed(image_folders, tmp_path_factory):
    """``copy(processes, kill_at, dest)``: a run SIGKILLed after step ``kill_at``, copied to ``dest``.

    Each killed run is made once and kept pristine; every test resumes its own copy of it."""
    made: dict[tuple[int, int], Path] = {}

    def copy(processes: int, kill_at: int, dest: Path) -> Path:
        if (processes, kill_at) not in made:
            out = tmp_path_factory.mktemp(f"killed{processes}x{kill_at}")
            result = run(image_folders, out, "--kill-at", str(kill_at), processes=processes)
            assert result.returncode != 0 and not (out / "last.safetensors").exists(), result.stderr[-3000:]
            made[processes, kill_at] = out
        shutil.copytree(made[processes, kill_at], dest)
        return dest

    return copy


def first_steps(out: Path, processes: int) -> list[dict]:
    """The first optimizer step each rank of the latest run in ``out`` ran, and what it resumed from."""
    return [json.loads((out / f"first_step_rank{rank}.json").read_text()) for rank in range(processes)]


# 1 process: 6 steps an epoch, the backbone unfreezes between steps 6 and 7; 2 processes: 3 steps an
# epoch, the unfreeze between steps 3 and 4. A kill after step N resumes from step N - 1. At the unfreeze
# itself, from the checkpoint of the last frozen step: the corrupt-checkpoint test (1 process, from step 6).
def test_one_process_killed_before_and_after_the_unfreeze_ends_bit_identical(image_folders, baselines, killed,
                                                                              tmp_path):
    """One 1-process run SIGKILLed twice, each time resumed with ``--resume latest``: after step 5, mid-epoch
    before the unfreeze (the resumed run unfreezes later), then after step 9, mid-epoch after it (the resumed
    run replays the unfreeze before the optimizer state is loaded); it ends bit-identical to the
    uninterrupted run, every epoch logged once, and each resumed run went on from its checkpoint, not
    through a silent retraining from step 1."""
    out = killed(1, 5, tmp_path / "run")
    killed_again = run(image_folders, out, "--resume", "latest", "--kill-at", "9")
    assert killed_again.returncode != 0 and not (out / "last.safetensors").exists(), killed_again.stderr[-3000:]
    assert "step 4" in killed_again.stdout
    assert [(f["step"], Path(f["resumed_from"]).name, f["param_groups"]) for f in first_steps(out, 1)] == \
        [(5, "step-00000004", 1)]
    resumed = run(image_folders, out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 8" in resumed.stdout
    assert [(f["step"], Path(f["resumed_from"]).name, f["param_groups"]) for f in first_steps(out, 1)] == \
        [(9, "step-00000008", 2)]
    assert_bit_identical(final_weights(out), final_weights(baselines[1]))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_two_processes_killed_preempted_and_killed_again_end_bit_identical(image_folders, baselines, killed,
                                                                            tmp_path):
    """One 2-process run, 3 steps an epoch, the unfreeze between steps 3 and 4, stopped three times and each
    time resumed with ``--resume latest`` (one run for all three, so the launches are shared):

    1. SIGKILL after step 2, mid-epoch before the unfreeze: the pair resumes from step 1 and unfreezes
       later, rebuilding DDP.
    2. SIGUSR1 to rank 0 only, during step 2: both ranks agree to stop, save step 3 together and exit 42
       (accelerate launch reports 1). The stop is at the unfreeze boundary: step 3 is epoch 0's last (frozen)
       step, so the resumed pair starts by unfreezing the backbone, adding its param group at the ramp's start
       and rebuilding DDP, all as the uninterrupted pair did.
    3. SIGKILL after step 5, mid-epoch after the unfreeze: the pair resumes from step 4, replaying the unfreeze
       before the optimizer state is loaded and DDP is built.

    Then the pair ends bit-identical to the uninterrupted one, every epoch logged once."""
    out = killed(2, 2, tmp_path / "run")
    stopped = run(image_folders, out, "--resume", "latest", "--signal-at", "2", processes=2)
    assert stopped.returncode in (PREEMPTED_EXIT_CODE, 1), stopped.stderr[-3000:]
    assert "step 1" in stopped.stdout
    assert [(f["step"], Path(f["resumed_from"]).name, f["param_groups"], f["ddp_covers_trainable"])
            for f in first_steps(out, 2)] == [(2, "step-00000001", 1, True)] * 2
    saved = out / "checkpoints" / "step-00000003"
    assert f"stopped by SIGUSR1; state saved in {saved}" in stopped.stderr
    assert f"stopped by a peer rank; state saved in {saved}" in stopped.stderr
    assert not (out / "checkpoints" / "step-00000004").exists()

    killed_again = run(image_folders, out, "--resume", "latest", "--kill-at", "5", processes=2)
    assert killed_again.returncode != 0 and not (out / "last.safetensors").exists(), killed_again.stderr[-3000:]
    # the resumed ranks' first step is the first unfrozen one: head and backbone groups, in DDP
    assert [(f["step"], Path(f["resumed_from"]).name, f["param_groups"], f["ddp_covers_trainable"])
            for f in first_steps(out, 2)] == [(4, "step-00000003", 2, True)] * 2

    resumed = run(image_folders, out, "--resume", "latest", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 4" in resumed.stdout
    assert [(f["step"], Path(f["resumed_from"]).name, f["param_groups"], f["ddp_covers_trainable"])
            for f in first_steps(out, 2)] == [(5, "step-00000004", 2, True)] * 2
    assert_bit_identical(final_weights(out), final_weights(baselines[2]))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.parametrize("saved, resumed_with, checkpoint, first_step, last_step, schedule_step, horizon", [
    (2, 1, "latest", 2, 17, 2, 18),  # 8 samples done = 2 one-process batches; 4 + 6 + 6 steps to go
    (1, 2, "step-00000004", 5, 11, 2, 9),  # 16 samples done = 2 two-process batches; 1 + 3 + 3 steps to go
])
def test_resume_with_another_process_count_warns_and_finishes(image_folders, killed, tmp_path, saved, resumed_with,
                                                              checkpoint, first_step, last_step, schedule_step,
                                                              horizon):
    """A 2-process checkpoint continued by 1 process and a 1-process one by 2 (named by path): the position
    in the epoch maps onto the new global batch, with a warning; the run finishes every epoch, its head's lr
    on a cosine over this run's 3 epochs from the mapped step (never at lr 0 before the last step)."""
    out = killed(saved, 2 if saved == 2 else 5, tmp_path / "run")
    resume = checkpoint if checkpoint == "latest" else str(out / "checkpoints" / checkpoint)
    result = run(image_folders, out, "--resume", resume, processes=resumed_with)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming a checkpoint of batch_size 4 x {saved} process(es) x 1 accumulation step(s) with batch_size 4 " \
           f"x {resumed_with} process(es)" in result.stderr
    assert [f["step"] for f in first_steps(out, resumed_with)] == [first_step] * resumed_with
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step-{last_step:08d}"
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and (out / "last.safetensors").is_file()
    head_lrs = {s["step"]: s["lr"][0] for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    mapped = schedule_step - (first_step - 1)  # this run's schedule step at global step s is s + mapped
    assert sorted(head_lrs) == list(range(1, last_step + 1))
    for step in range(first_step, last_step + 1):
        expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * (step + mapped) / horizon))
        assert head_lrs[step] == pytest.approx(expected, abs=1e-12), step


def test_resume_position_that_does_not_divide_the_new_global_batch_is_refused(image_folders, killed, tmp_path):
    """12 samples into an epoch cannot be continued by 2 processes x batch 4."""
    out = killed(1, 5, tmp_path / "run")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run(image_folders, out, "--resume", str(out / "checkpoints" / "step-00000003"), processes=2)
    assert result.returncode != 0
    assert "stopped 12 samples into epoch 0, not a multiple of this run's 8 samples per optimizer step (batch_size 4 " \
           "x 2 process(es) x 1 accumulation step(s)): resume with the checkpoint's batch_size 4 x 1 process(es)" \
        in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


CLI_TRAIN = ["--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
             "--max-epochs", "3", "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "1", "--num-workers", "0",
             "--seed", "0", "--save-every-n-steps", "1", "--check-every-n-steps", "1", "--log-every-n-steps", "1",
             "--no-progress-bar"]


class CliTrain:
    """``python -m dist_finetune train`` on the test folders in the background; output to files (never a
    full pipe that would stall it)."""

    def __init__(self, data: Path, out: Path, *args: str):
        self.out, self.logs = out, [tempfile.TemporaryFile("w+") for _ in range(2)]
        command = [sys.executable, "-m", "dist_finetune", "train", "--train-folder", str(data / "train"),
                   "--val-folder", str(data / "val"), "--output-dir", str(out), *CLI_TRAIN, *args]
        self.process = subprocess.Popen(command, stdout=self.logs[0], stderr=self.logs[1], text=True, env=ENV)

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it has ended."""
        code = self.process.wait(timeout=600)
        stdout, stderr = (log.seek(0) or log.read() for log in self.logs)
        return code, stdout, stderr

    def signal_when_past(self, step: int, signum: int) -> tuple[int, str, str]:
        """Send ``signum`` once steps.jsonl shows a step after ``step``, then :meth:`finish`."""
        deadline = time.monotonic() + 300
        while not any(s > step for s in logged_steps(self.out)):
            assert self.process.poll() is None, self.finish()[2][-3000:]
            assert time.monotonic() < deadline, "training never got under way"
            time.sleep(0.005)
        self.process.send_signal(signum)
        return self.finish()


def logged_steps(out: Path) -> list[int]:
    path = out / "steps.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.fixture(scope="module")
def cli_uninterrupted(image_folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_uninterrupted")
    code, _, stderr = CliTrain(image_folders, out).finish()
    assert code == 0, stderr[-3000:]
    return out


def test_cli_exits_42_on_sigusr1_and_sigterm_and_resumes_exactly(image_folders, cli_uninterrupted, tmp_path):
    """``dist-finetune train`` itself: SIGUSR1 in the first epoch, then SIGTERM to the run resumed from
    the checkpoint it saved (``--resume PATH``); each time exit code 42 after a checkpoint. ``--resume
    latest`` then finishes bit-identical to the uninterrupted run."""
    out, stopped_at = tmp_path / "run", 0
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        resume = ["--resume", str(out / "checkpoints" / f"step-{stopped_at:08d}")] if stopped_at else []
        code, stdout, stderr = CliTrain(image_folders, out, *resume).signal_when_past(stopped_at, signum)
        assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
        if resume:
            assert f"resumed from {resume[1]} at epoch" in stdout and f"step {stopped_at}\n" in stdout
        saved = re.search(rf"stopped by {signum.name}; state saved in ([^;\s]+);", stderr)
        assert saved, stderr[-3000:]
        step = int(Path(saved[1]).name.removeprefix("step-"))
        assert step > stopped_at and not (out / "last.safetensors").exists()
        stopped_at = step
    assert stopped_at < 18, "stopped before the run's last step"
    code, stdout, stderr = CliTrain(image_folders, out, "--resume", "latest").finish()
    assert code == 0, stderr[-3000:]
    assert f"step {stopped_at}\n" in stdout
    assert logged_steps(out) == list(range(1, 19)), "every step logged once"
    assert_bit_identical(final_weights(out), final_weights(cli_uninterrupted))


def test_corrupt_latest_checkpoint_falls_back_to_an_intact_one(image_folders, baselines, killed, tmp_path):
    out = killed(1, 9, tmp_path / "run")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000007", "step-00000008"]  # keep_last=3
    model = root / "step-00000008" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated by a crash or a full disk
    altered = root / "step-00000007" / "model.safetensors"  # one bit flipped in the weights: same size
    content = bytearray(altered.read_bytes())
    content[-1] ^= 0x01
    altered.write_bytes(bytes(content))
    (root / ".step-00000009.partial").mkdir()  # a write that never finished
    resumed = run(image_folders, out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{root / 'step-00000008'} is corrupt" in resumed.stderr
    assert f"{root / 'step-00000007'} is corrupt" in resumed.stderr and "step 6" in resumed.stdout
    assert [(f["step"], Path(f["resumed_from"]).name) for f in first_steps(out, 1)] == [(7, "step-00000006")]
    assert_bit_identical(final_weights(out), final_weights(baselines[1]))
    # the checkpoint resumed from is kept; the corrupt ones, newer than it, are set aside
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000006", "step-00000016", "step-00000017",
                                                          "step-00000018"]
    assert sorted(p.name for p in next(root.glob("abandoned-*")).iterdir()) == ["step-00000007", "step-00000008"]
