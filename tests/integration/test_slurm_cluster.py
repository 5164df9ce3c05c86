"""The SLURM scripts on a real (local, two-node) SLURM cluster.

Needs root and ``apt-get install -y slurm-wlm munge``; otherwise every test here is skipped with a
reason. ``tests/integration/slurm_cluster.py`` brings the cluster up once per session (about 1 s) in a private
temporary directory and stops it by PID afterwards. The batch scripts run unchanged: everything
test-specific is an sbatch option (``--nodes``, ``--gres=none`` with the CPUs and memory of this
machine's small nodes, ``--output``, ``--chdir``) or an environment variable.

Nodes n1 and n2 are two slurmd daemons on this host, so "multi-node" here means two
``accelerate launch`` agents on loopback that rendezvous like two machines would.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import free_port
import torch

from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
MULTI = ROOT / "scripts" / "slurm_multi_node.sbatch"
SINGLE = ROOT / "scripts" / "slurm_single_node.sbatch"

# Stands in for the real package (found first because `python -m` searches the job's working
# directory first): joins the process group like the runner does and reports its rank.
FAKE_RUNNER = r'''
import json, os, sys
import torch
from accelerate import Accelerator
world = int(os.environ.get("WORLD_SIZE", "1"))
acc = Accelerator(cpu=world > 1 and not torch.cuda.is_available())
ranks = acc.gather(torch.tensor([acc.process_index])).tolist()
info = {"rank": acc.process_index, "world": acc.num_processes, "gathered": ranks,
        "node": os.environ.get("SLURMD_NODENAME"), "argv": sys.argv[1:]}
os.write(1, ("FAKE_RUNNER " + json.dumps(info) + "\n").encode())
# without this, gloo sometimes aborts at interpreter exit ("terminate called without an active
# exception", SIGABRT) and the launcher reports a failure
acc.end_training()
'''



def fake_package(tmp_path: Path) -> Path:
    """A working directory whose ``dist_finetune`` is the fake runner."""
    pkg = tmp_path / "work" / "dist_finetune"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_RUNNER)
    shutil.copy(ROOT / "dist_finetune" / "slurm_job.sh", pkg)  # the batch scripts' shared part
    return pkg.parent


def runner_lines(log: str) -> list[dict]:
    return [json.loads(line.split("FAKE_RUNNER ", 1)[1]) for line in log.splitlines()
            if "FAKE_RUNNER " in line]


def submit(cluster, script: Path, args: list[str], *, nodes: int, workdir: Path, log: Path,
           env: dict | None = None) -> str:
    """sbatch the script unchanged; only sbatch options and environment variables differ.
    An explicit free port: parallel test sessions all see job id 1 on their fresh controllers."""
    env = {"MAIN_PROCESS_PORT": str(free_port()), "OMP_NUM_THREADS": "1", **(env or {})}
    return cluster.sbatch(
        [f"--nodes={nodes}", "--gres=none", "--cpus-per-task=1", "--mem=1G", f"--chdir={workdir}",
         f"--output={log}", "--job-name=dftest", str(script), *args],
        env=env,
    )


# ---------------------------------------------------------------- the cluster itself
def test_two_node_smoke(slurm_cluster, tmp_path):
    log = tmp_path / "smoke.out"
    job = slurm_cluster.sbatch([
        "--nodes=2", f"--output={log}", "--wrap",
        'echo "list=$SLURM_JOB_NODELIST"; '
        'srun --nodes=2 --ntasks=2 bash -c \'echo "task node=$SLURM_NODEID on $SLURMD_NODENAME"\'',
    ])
    info = slurm_cluster.wait(job, timeout=30)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text + slurm_cluster.logs()
    assert "list=n[1-2]" in text
    assert "task node=0 on n1" in text and "task node=1 on n2" in text


# ---------------------------------------------------------------- the scripts, fake runner
def test_single_node_script_two_cpu_ranks(slurm_cluster, tmp_path):
    """slurm_single_node.sbatch with GPUS_PER_NODE=2 on a CPU node: two gloo ranks."""
    workdir = fake_package(tmp_path)
    log = tmp_path / "single.out"
    job = submit(slurm_cluster, SINGLE, ["--output-dir", "out"], nodes=1, workdir=workdir, log=log,
                 env={"GPUS_PER_NODE": "2"})
    info = slurm_cluster.wait(job, timeout=90)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    ranks = runner_lines(text)
    assert sorted(r["rank"] for r in ranks) == [0, 1], text
    assert all(r["world"] == 2 and r["gathered"] == [0, 1] for r in ranks)
    assert all(r["argv"] == ["train", "--output-dir", "out", "--resume", "latest"] for r in ranks)


# ---------------------------------------------------------------- the real thing
def _write_images(root: Path, classes=("cat", "dog"), per_class: int = 8, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4, index] = 230
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")


def _submit_training(cluster, tmp_path: Path, epochs: int, log_name: str = "job.out",
                     extra: tuple[str, ...] = ()) -> tuple[str, Path, Path]:
    """slurm_multi_node.sbatch on 2 nodes x 1 CPU process, timm's tiny test_resnet on 2 x 8 tiny images.
    Returns (job id, output dir, log). Submitted again with the same ``tmp_path``, it continues the run."""
    data, out, workdir, log = tmp_path / "data", tmp_path / "out", tmp_path / "work", tmp_path / log_name
    if not data.exists():
        _write_images(data)
    workdir.mkdir(exist_ok=True)
    args = ["--train-folder", str(data / "train"), "--val-folder", str(data / "val"),
            "--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
            "--max-epochs", str(epochs), "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "1",
            "--num-workers", "0", "--no-progress-bar", "--output-dir", str(out), *extra]
    job = submit(cluster, MULTI, args, nodes=2, workdir=workdir, log=log,
                 env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    return job, out, log


EPOCHS = 4


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory) -> tuple[dict, Path, str]:
    """One uninterrupted multi-node run: (job info, output dir, log text)."""
    job, out, log = _submit_training(slurm_cluster, tmp_path_factory.mktemp("uninterrupted"), epochs=EPOCHS)
    info = slurm_cluster.wait(job, timeout=150)
    return info, out, log.read_text()


def test_multi_node_training_on_cpu(uninterrupted):
    """slurm_multi_node.sbatch, unchanged, trains on 2 nodes x 1 CPU process (world size 2)."""
    info, out, text = uninterrupted
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text}"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last.safetensors", "model.safetensors"], text
    assert "world size 2 on CPU" in text
    for rank, node in ((0, "n1"), (1, "n2")):
        assert re.search(rf"^{rank}: \[slurm_multi_node\] node {rank} of 2 \({node}\): "
                         rf"accelerate launch --machine_rank {rank} --multi_gpu --num_machines 2 "
                         rf"--num_processes 2 ", text, re.M), text
    assert re.search(r"^0: epoch 1:", text, re.M), text  # the main process logged both epochs
    assert text.rstrip().endswith("training finished")


def _wait_for(condition, cluster, job: str, log: Path, what: str, timeout: float = 90) -> None:
    """Until ``condition()`` holds while the job is pending or running."""
    deadline = time.monotonic() + timeout
    while not condition():
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"), (what, state, log.read_text())
        assert time.monotonic() < deadline, (what, log.read_text())
        time.sleep(0.05)


def assert_same_final_weights(out: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    for name in ("last.safetensors", "model.safetensors"):  # the final weights, and the best epoch's
        resumed, expected = load_file(out / name), load_file(reference / name)
        assert resumed.keys() == expected.keys()
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), f"resumed {name} differs"


def test_preempted_requeued_cancelled_and_resubmitted_run_ends_exactly(slurm_cluster, tmp_path, uninterrupted):
    """One multi-node run stopped twice, each stop the way a cluster does it:

    1. Preemption: SIGUSR1 to the batch shell (what --signal=B:USR1@120 does) mid-training reaches both
       ranks through srun while `accelerate launch` survives it; both ranks checkpoint and exit 42; the
       script requeues; the restarted job (SLURM_RESTART_COUNT=1) resumes with `--resume latest`.
    2. Plain `scancel JOB` during the restarted job sends SIGTERM to every process of the job at once, the
       training processes included: each runner's own SIGTERM handler keeps it alive to finish its step,
       save and exit 42 before KillWait's SIGKILL; the script does not requeue (SIGTERM means stop).
    3. Submitting the same command again continues from that step and finishes: every epoch logged once,
       final weights bit-identical to the uninterrupted run (so logging and checking every step, on here,
       changes no weight either)."""
    every_step = ("--log-every-n-steps", "1", "--check-every-n-steps", "1")
    job, out, log = _submit_training(slurm_cluster, tmp_path, epochs=EPOCHS, extra=every_step)
    metrics, steps = out / "metrics.jsonl", out / "steps.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), slurm_cluster, job, log, "epoch 0")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])
    resumed_at = re.compile(r"^0: resumed from \S+ at epoch \d+, batch \d+, step (\d+)$", re.M)
    _wait_for(lambda: resumed_at.search(log.read_text()), slurm_cluster, job, log, "the requeued job's resume")
    first = int(resumed_at.search(log.read_text()).group(1))

    def trained_past_the_resume() -> bool:
        return max((json.loads(line)["step"] for line in steps.read_text().splitlines()), default=0) > first

    _wait_for(trained_past_the_resume, slurm_cluster, job, log, "a step after the resume")
    slurm_cluster.run(["scancel", job])
    info = slurm_cluster.wait(job, timeout=150)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", (info, text)
    # 1: preempted and requeued; each launcher stayed alive and saw its worker exit 42 (reported as its exit 1)
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text
    assert len(re.findall(r"exitcode\s*:\s*42", text)) >= 2, text
    assert "start #0" in text and "start #1 (SLURM_RESTART_COUNT=1)" in text
    assert len(re.findall(r"^\d: \[slurm_multi_node\] node .* --resume latest$", text, re.M)) == 4  # 2 nodes x 2
    # 2: cancelled; both runners lived to save the same step, and said so
    restarted = text[text.index("start #1"):]
    stops = re.findall(r"^(\d): dist-finetune train: stopped by (SIGTERM|SIGUSR1|a peer rank); state saved in "
                       r"(\S+step-(\d+));", restarted, re.M)
    assert sorted(rank for rank, *_ in stops) == ["0", "1"], text
    assert len({saved for _, _, saved, _ in stops}) == 1, text
    stopped_at = int(stops[0][3])
    assert first < stopped_at < EPOCHS * 2, "stopped after the resume, before the last step"
    assert text.count("checkpoint saved, job not requeued") == 1 and text.count("requeueing") == 1, text
    # 3: resubmitted
    job, _, log = _submit_training(slurm_cluster, tmp_path, epochs=EPOCHS, log_name="again.out", extra=every_step)
    info = slurm_cluster.wait(job, timeout=150)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert [int(step) for step in resumed_at.findall(text)] == [stopped_at], text
    assert text.rstrip().endswith("training finished")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last.safetensors", "model.safetensors"]
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == list(range(EPOCHS))
    assert_same_final_weights(out, uninterrupted[1])
