"""The SLURM batch scripts, run without SLURM: fake ``srun``, ``scontrol``, ``nvidia-smi`` and
``accelerate`` executables on PATH record what the scripts would run on each node.

The fake srun starts its command once per node (SLURM_NODEID 0..N-1, like ``--ntasks-per-node=1``)
and forwards SIGUSR1 to those tasks, as the real srun does. The fake accelerate writes its argv,
a few environment variables and whether SIGUSR1 was ignored when it started, then exits with the
code FAKE_EXIT gives for its node ("0", "42", or per node "0,3").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from slurm_cluster import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
MULTI = ROOT / "scripts" / "slurm_multi_node.sbatch"
SINGLE = ROOT / "scripts" / "slurm_single_node.sbatch"
SCRIPTS = [pytest.param(SINGLE, id="single_node"), pytest.param(MULTI, id="multi_node")]
JOB_ID = "1234"
PORT = str(20000 + int(JOB_ID) % 10000)  # the scripts' derived default

FAKE_SRUN = r'''
import os, signal, subprocess, sys, json
args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.path.join(os.environ["FAKE_DIR"], "srun.json"), "a") as f:
    f.write(json.dumps({"opts": opts, "cmd": args}) + "\n")
nodes = int(next((o.split("=", 1)[1] for o in opts if o.startswith("--nodes=")), "1"))
hosts = os.environ.get("FAKE_HOSTS", "").split(",")
procs = []
for i in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0",
               SLURMD_NODENAME=hosts[i] if i < len(hosts) else f"node{i}")
    procs.append(subprocess.Popen(args, env=env))
def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
signal.signal(signal.SIGUSR1, forward)
codes = []
for p in procs:
    while True:
        try:
            codes.append(p.wait())
            break
        except InterruptedError:
            continue
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

FAKE_ACCELERATE = r'''
import os, signal, sys, json, time
d = os.environ["FAKE_DIR"]
node = int(os.environ.get("SLURM_NODEID", "0"))
def ignored(sig):
    with open("/proc/self/status") as f:
        mask = int(next(l.split()[1] for l in f if l.startswith("SigIgn:")), 16)
    return bool(mask >> (sig - 1) & 1)
record = {
    "argv": sys.argv[1:],
    "env": {k: os.environ.get(k) for k in
            ("ACCELERATE_USE_CPU", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "SLURMD_NODENAME")},
    "usr1_ignored": ignored(signal.SIGUSR1),
}
with open(os.path.join(d, f"accelerate.{node}.json"), "w") as f:
    json.dump(record, f)
codes = os.environ.get("FAKE_EXIT", "0").split(",")
code = int(codes[min(node, len(codes) - 1)])
if os.environ.get("FAKE_WAIT_SIGNAL"):
    # behave like a dist_finetune worker: install handlers, wait for the preemption signal
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
    signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
    open(os.path.join(d, f"ready.{node}"), "w").close()
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(os.path.join(d, f"signal.{node}"), "w") as f:
        f.write(",".join(got))
sys.exit(code)
'''

FAKE_SCONTROL = r'''
import os, sys
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
    print("\n".join(os.environ["FAKE_HOSTS"].split(",")))
elif a[:2] == ["show", "node"]:
    addrs = dict(x.split("=") for x in os.environ.get("FAKE_NODEADDRS", "").split(",") if x)
    if a[2] not in addrs:
        sys.exit(f"Node {a[2]} not found")
    print(f"NodeName={a[2]} Arch=x86_64 CoresPerSocket=1\n   CPUAlloc=0 CPUTot=2 CPULoad=0.01\n"
          f"   AvailableFeatures=(null)\n   NodeAddr={addrs[a[2]]} NodeHostName={a[2]} Version=22.05.8")
elif a[:1] == ["requeue"]:
    with open(os.path.join(os.environ["FAKE_DIR"], "requeue.log"), "a") as f:
        f.write(" ".join(a) + "\n")
    sys.exit(int(os.environ.get("FAKE_REQUEUE_RC", "0")))
else:
    sys.exit(f"fake scontrol: unsupported {a}")
'''

FAKE_NVIDIA_SMI = r'''
import os, sys
n = int(os.environ.get("FAKE_GPUS", "0"))
if n == 0:
    sys.exit("No devices were found")
for i in range(n):
    print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000{i})")
'''


class Run:
    """Result of one script run: exit code, output, and what the fakes recorded."""

    def __init__(self, proc, fake_dir: Path):
        self.rc = proc.returncode
        self.out = proc.stdout if isinstance(proc.stdout, str) else ""
        self.dir = fake_dir

    def node(self, i: int) -> dict:
        return json.loads((self.dir / f"accelerate.{i}.json").read_text())

    def argv(self, i: int) -> list[str]:
        return self.node(i)["argv"]

    @property
    def nodes_run(self) -> int:
        return len(list(self.dir.glob("accelerate.*.json")))

    @property
    def srun(self) -> list[dict]:
        f = self.dir / "srun.json"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    @property
    def requeues(self) -> list[str]:
        f = self.dir / "requeue.log"
        return f.read_text().splitlines() if f.exists() else []


@pytest.fixture
def fake(tmp_path):
    """Returns ``start(script, *args, **env)`` / ``run(script, *args, **env)`` with fakes on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("srun", FAKE_SRUN), ("accelerate", FAKE_ACCELERATE),
                       ("scontrol", FAKE_SCONTROL), ("nvidia-smi", FAKE_NVIDIA_SMI)]:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n{body}")
        exe.chmod(0o755)
    fake_dir = tmp_path / "record"
    fake_dir.mkdir()

    def env_for(nodes: int, **extra) -> dict:
        hosts = [f"gpu-a{i:02d}" for i in range(1, nodes + 1)]
        env = {
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",  # a python with dist_finetune
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "FAKE_DIR": str(fake_dir),
            "FAKE_HOSTS": ",".join(hosts),
            "FAKE_NODEADDRS": ",".join(f"{h}=10.1.0.{i}" for i, h in enumerate(hosts, 1)),
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NAME": "dist-finetune",
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": f"gpu-a[01-{nodes:02d}]" if nodes > 1 else hosts[0],
            "SLURMD_NODENAME": hosts[0],
        }
        if "PYTHONPATH" in os.environ:  # the checkout under test, when it is not the installed one
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        env.update({k: str(v) for k, v in extra.items()})
        return env

    class Fake:
        dir = fake_dir

        @staticmethod
        def run(script: Path, *args: str, nodes: int = 1, **env) -> Run:
            proc = subprocess.run(["bash", str(script), *args], env=env_for(nodes, **env),
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
            return Run(proc, fake_dir)

        @staticmethod
        def start(script: Path, *args: str, nodes: int = 1, **env) -> subprocess.Popen:
            return subprocess.Popen(["bash", str(script), *args], env=env_for(nodes, **env),
                                    cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)

    return Fake


TRAIN = ["--config", "run.yaml", "--output-dir", "runs/my exp", "--max-epochs", "3"]
TAIL = ["-m", "dist_finetune", "train", *TRAIN, "--resume", "latest"]


# ---------------------------------------------------------------- exact command lines
def test_multi_node_two_nodes_cpu(fake):
    r = fake.run(MULTI, *TRAIN, nodes=2)
    assert r.rc == 0, r.out
    assert r.nodes_run == 2
    for rank in (0, 1):
        assert r.argv(rank) == [
            "launch", "--machine_rank", str(rank), "--multi_gpu",
            "--num_machines", "2", "--num_processes", "2",
            "--main_process_ip", "10.1.0.1", "--main_process_port", PORT, *TAIL,
        ]
        node = r.node(rank)
        assert node["env"]["ACCELERATE_USE_CPU"] == "1"  # no GPU anywhere: gloo on CPU
        assert node["env"]["SLURMD_NODENAME"] == f"gpu-a0{rank + 1}"
        assert node["usr1_ignored"], "the launcher must survive SIGUSR1"
    (srun,) = r.srun
    assert srun["opts"] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--label"]
    assert srun["cmd"][:2] == ["bash", "-c"]
    assert r.requeues == []
    assert "start #0" in r.out and "training finished" in r.out
    # each node logs the command it runs, shell-quoted
    assert ("node 1 of 2 (gpu-a02): accelerate launch --machine_rank 1 --multi_gpu" in r.out
            and r"--output-dir runs/my\ exp" in r.out), r.out


def test_multi_node_gpus_from_gres(fake):
    r = fake.run(MULTI, *TRAIN, nodes=2, SLURM_GPUS_ON_NODE=4, SLURM_CPUS_PER_TASK=16)
    assert r.rc == 0, r.out
    for rank in (0, 1):
        assert r.argv(rank) == [
            "launch", "--machine_rank", str(rank), "--multi_gpu",
            "--num_machines", "2", "--num_processes", "8",
            "--main_process_ip", "10.1.0.1", "--main_process_port", PORT, *TAIL,
        ]
        assert r.node(rank)["env"]["ACCELERATE_USE_CPU"] is None
    assert "--cpus-per-task=16" in r.srun[0]["opts"]


def test_multi_node_gpus_from_nvidia_smi_and_config_file(fake):
    r = fake.run(MULTI, *TRAIN, nodes=3, FAKE_GPUS=2,
                 ACCELERATE_CONFIG="launch_configs/multi_node.yaml")
    assert r.rc == 0, r.out
    assert r.nodes_run == 3
    assert r.argv(2) == [
        "launch", "--machine_rank", "2", "--config_file", "launch_configs/multi_node.yaml",
        "--num_machines", "3", "--num_processes", "6",
        "--main_process_ip", "10.1.0.1", "--main_process_port", PORT, *TAIL,
    ]
    assert r.node(2)["env"]["ACCELERATE_USE_CPU"] is None


def test_multi_node_one_node(fake):
    r = fake.run(MULTI, *TRAIN, nodes=1)
    assert r.rc == 0, r.out
    assert r.argv(0) == [
        "launch", "--machine_rank", "0", "--num_machines", "1", "--num_processes", "1",
        "--main_process_ip", "10.1.0.1", "--main_process_port", PORT, *TAIL,
    ]


def test_multi_node_address_fallbacks_and_overrides(fake):
    # node names that scontrol does not know: the first host name is used as is
    r = fake.run(MULTI, *TRAIN, nodes=2, FAKE_NODEADDRS="", GPUS_PER_NODE=2)
    assert r.rc == 0, r.out
    argv = r.argv(1)
    assert argv[argv.index("--main_process_ip") + 1] == "gpu-a01"
    assert argv[argv.index("--num_processes") + 1] == "4"
    # explicit address and port win
    r = fake.run(MULTI, *TRAIN, nodes=2, MAIN_PROCESS_IP="192.168.7.7", MAIN_PROCESS_PORT=29999)
    argv = r.argv(0)
    assert argv[argv.index("--main_process_ip") + 1] == "192.168.7.7"
    assert argv[argv.index("--main_process_port") + 1] == "29999"


@pytest.mark.parametrize(
    "env, launch, cpu",
    [
        ({}, ["--num_processes", "1"], "1"),  # no GPU: one CPU process, plain launcher
        ({"SLURM_GPUS_ON_NODE": 1}, ["--num_processes", "1"], None),
        ({"FAKE_GPUS": 4}, ["--multi_gpu", "--num_processes", "4"], None),
        ({"GPUS_PER_NODE": 2}, ["--multi_gpu", "--num_processes", "2"], "1"),  # 2 gloo ranks
        ({"GPUS_PER_NODE": 2, "DIST_FINETUNE_CPU": 0}, ["--multi_gpu", "--num_processes", "2"], None),
        ({"SLURM_GPUS_ON_NODE": 2, "DIST_FINETUNE_CPU": 1},
         ["--multi_gpu", "--num_processes", "2"], "1"),
        ({"ACCELERATE_CONFIG": "launch_configs/multi_gpu_bf16.yaml", "SLURM_GPUS_ON_NODE": 8},
         ["--config_file", "launch_configs/multi_gpu_bf16.yaml", "--num_processes", "8"], None),
    ],
    ids=["cpu", "one_gpu", "nvidia_smi", "cpu_2proc", "forced_gpu", "forced_cpu", "config"],
)
def test_single_node_command(fake, env, launch, cpu):
    r = fake.run(SINGLE, *TRAIN, **env)
    assert r.rc == 0, r.out
    assert r.nodes_run == 1
    assert r.argv(0) == ["launch", *launch, "--main_process_port", PORT, *TAIL]
    assert r.node(0)["env"]["ACCELERATE_USE_CPU"] == cpu
    assert r.node(0)["usr1_ignored"]
    assert r.srun[0]["opts"] == ["--nodes=1", "--ntasks=1"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("resume", [["--resume", "none"], ["--resume=runs/x/checkpoints/3"]])
def test_user_resume_is_not_overridden(fake, script, resume):
    r = fake.run(script, "--output-dir", "o", *resume)
    assert r.rc == 0, r.out
    argv = r.argv(0)
    assert argv[argv.index("train") + 1:] == ["--output-dir", "o", *resume]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_arguments_still_resumes(fake, script):
    r = fake.run(script)
    assert r.rc == 0, r.out
    assert r.argv(0)[-5:] == ["-m", "dist_finetune", "train", "--resume", "latest"]
    assert r.node(0)["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"


# ---------------------------------------------------------------- exit codes and requeue
EXIT_CASES = [
    # (script, FAKE_EXIT per node, nodes, expected script exit code, requeued?)
    *[(script, "0", 1, 0, False) for script in (SINGLE, MULTI)],
    # checkpointed for preemption: requeue; the batch script itself succeeds
    *[(script, "42", 1, 0, True) for script in (SINGLE, MULTI)],
    *[(script, "3", 1, 3, False) for script in (SINGLE, MULTI)],
    # a failure without any preemption signal is not requeued
    *[(script, "1", 1, 1, False) for script in (SINGLE, MULTI)],
    (MULTI, "0,3", 2, 3, False),
    (MULTI, "42,42", 2, 0, True),
]


@pytest.mark.parametrize("script, exit_codes, nodes, rc, requeued", EXIT_CASES,
                         ids=[f"{c[0].stem}-{c[1]}" for c in EXIT_CASES])
def test_exit_codes(fake, script, exit_codes, nodes, rc, requeued):
    r = fake.run(script, *TRAIN, nodes=nodes, FAKE_EXIT=exit_codes, SLURM_RESTART_COUNT=2)
    assert r.rc == rc, r.out
    assert r.requeues == ([f"requeue {JOB_ID}"] if requeued else [])
    assert "start #2 (SLURM_RESTART_COUNT=2)" in r.out


@pytest.mark.parametrize("script", SCRIPTS)
def test_failed_requeue_propagates_exit_code(fake, script):
    r = fake.run(script, *TRAIN, FAKE_EXIT=42, FAKE_REQUEUE_RC=1)
    assert r.rc == 42, r.out
    assert r.requeues == [f"requeue {JOB_ID}"]
    assert "requeue failed" in r.out


# ---------------------------------------------------------------- signals
def _wait_files(paths, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.02)


@pytest.mark.parametrize("script, nodes", [(SINGLE, 1), (MULTI, 2)], ids=["single", "multi"])
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_to_batch_shell_reaches_every_node_and_requeues(fake, script, nodes, sig):
    # what `--signal=B:USR1@120` or `scancel -b --signal=...` does: only the batch shell is told.
    # accelerate launch exits 1 when its workers exit 42, hence FAKE_EXIT=1. Every node checkpoints
    # either way; only SIGUSR1 (the time-limit warning) requeues: SIGTERM means stop.
    proc = fake.start(script, *TRAIN, nodes=nodes, FAKE_WAIT_SIGNAL=1, FAKE_EXIT=1)
    try:
        _wait_files([fake.dir / f"ready.{i}" for i in range(nodes)], proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for i in range(nodes):
        assert (fake.dir / f"signal.{i}").read_text() == "USR1"
    assert f"got SIG{sig.name[3:]}" in out
    if sig == signal.SIGUSR1:
        assert proc.returncode == 0, out
        assert (fake.dir / "requeue.log").read_text().split() == ["requeue", JOB_ID]
    else:
        assert proc.returncode == 1 and not (fake.dir / "requeue.log").exists(), out
        assert "training stopped by SIGTERM (exit 1): checkpoint saved, job not requeued" in out


# ---------------------------------------------------------------- the scripts themselves
@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_headers(script):
    text = script.read_text()
    headers = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    names = {h.split("=")[0] for h in headers}
    assert {"--job-name", "--nodes", "--gres", "--time", "--requeue", "--open-mode",
            "--output", "--signal", "--ntasks-per-node"} <= names
    assert "--signal=B:USR1@120" in headers
    assert "--open-mode=append" in headers
    output = next(h for h in headers if h.startswith("--output="))
    assert "%x" in output and "%j" in output
    # sbatch stops reading options at the first command: every header comes before `set -euo`
    assert text.index("set -euo pipefail") > max(m.start() for m in re.finditer("^#SBATCH", text, re.M))
    assert text.startswith("#!/bin/bash\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_cpus_and_memory_are_requested_for_every_gpu(script):
    """One launcher task per node holds all its processes: without --cpus-per-task it may get one CPU for
    every GPU process together, and default_num_workers then starts no loader workers. Each process
    needs a core of its own and one more for at least one worker; memory is asked for explicitly."""
    headers = dict(h.partition("=")[::2] for h in re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M))
    assert headers["--ntasks-per-node"] == "1"
    gpus = int(headers["--gres"].rsplit(":", 1)[1])
    cpus = int(headers["--cpus-per-task"])
    assert cpus >= 2 * gpus and cpus % gpus == 0, f"{cpus} CPUs for {gpus} GPUs"
    memory = re.fullmatch(r"(\d+)G", headers["--mem"])
    assert memory and int(memory.group(1)) >= 16 * gpus, f"--mem={headers['--mem']} for {gpus} GPUs"


def test_too_few_cpus_for_the_processes_are_warned_about_naming_the_sbatch_option(monkeypatch):
    """What a job with one CPU per node and 4 GPU processes sees: the main process warns once, naming
    the option to change; with enough CPUs, or outside SLURM, nothing is said."""
    from dist_finetune.distributed import make_accelerator

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    with pytest.warns(UserWarning, match=r"SLURM gave this node 1 CPU\(s\) for 4 processes: .* no workers.*"
                                         r"`#SBATCH --cpus-per-task=N`"):
        make_accelerator()
    for cpus in ("4", None):
        if cpus is None:
            monkeypatch.delenv("SLURM_CPUS_ON_NODE")
        else:
            monkeypatch.setenv("SLURM_CPUS_ON_NODE", cpus)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            make_accelerator()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        skip_or_fail("shellcheck not installed (apt-get install shellcheck)")
    subprocess.run(["shellcheck", "-x", "-s", "bash", str(script)], check=True)  # -x: with the shared part


def test_missing_slurm_tools_fail_instead_of_skipping_where_ci_requires_them(monkeypatch):
    """.ci/run sets DIST_FINETUNE_REQUIRE_SLURM=1: there a missing shellcheck or SLURM is a failure, never a
    silent skip; elsewhere (unset or 0) a skip with the reason."""
    for value, outcome in ((None, pytest.skip.Exception), ("0", pytest.skip.Exception), ("1", pytest.fail.Exception)):
        if value is None:
            monkeypatch.delenv("DIST_FINETUNE_REQUIRE_SLURM", raising=False)
        else:
            monkeypatch.setenv("DIST_FINETUNE_REQUIRE_SLURM", value)
        with pytest.raises(outcome, match="shellcheck not installed"):
            skip_or_fail("shellcheck not installed")


def test_the_shared_job_is_found_through_the_package_not_beside_the_script(fake, tmp_path):
    """sbatch runs a copy of the script from its spool directory: a copy elsewhere must still work,
    and without a python that imports dist_finetune the script says how to fix the environment."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text(SINGLE.read_text())
    ran = fake.run(copy, "--max-epochs", "1")
    assert ran.rc == 0 and ran.argv(0)[-5:] == ["train", "--max-epochs", "1", "--resume", "latest"], ran.out
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1", "HOME": str(tmp_path)}
    system = subprocess.run(["/usr/bin/env", "python3", "-c", "import dist_finetune"], env=env, cwd=tmp_path,
                            capture_output=True)
    if system.returncode == 0:
        pytest.skip("this machine's system python imports dist_finetune")
    broken = subprocess.run(["bash", str(copy)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert broken.returncode == 2 and "cannot import dist_finetune: activate its environment" in broken.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_refuses_to_run_outside_slurm(script, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "sbatch" in r.stderr
