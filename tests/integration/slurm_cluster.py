"""A throw-away SLURM cluster on loopback for the ``slurm`` tests.

``LocalSlurmCluster`` starts munged, slurmctld and N slurmd daemons (nodes ``n1``..``nN``, all on
this host, distinct ports) under a private temporary directory with its own slurm.conf, munge key
and socket, so it never touches a system-wide SLURM or another test session's cluster. Everything
is stopped by PID at the end: jobs are cancelled first, then any slurmstepd or job process that
still carries our SLURM_CONF, then the daemons.

Requirements: Linux, root (slurmd must start jobs as other users' processes), and
``apt-get install -y slurm-wlm munge`` (Debian bookworm: Slurm 22.05). ``missing_requirements()``
says why the cluster cannot run here; the ``slurm_cluster`` fixture turns that into a skip, or into a
failure under ``DIST_FINETUNE_REQUIRE_SLURM=1`` (what ``.ci/run`` sets: CI never passes without them).

Use it from pytest through the session fixture::

    from slurm_cluster import slurm_cluster  # noqa: F401  (re-exported fixture)

    @pytest.mark.slurm
    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(["--nodes=2", "--wrap", "hostname"])
        assert slurm_cluster.wait(job)["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
ENABLE_HINT = (
    "run as root on Linux after `apt-get install -y slurm-wlm munge` "
    "(set DIST_FINETUNE_SKIP_SLURM=1 to skip these tests deliberately)"
)
REQUIRE_VARIABLE = "DIST_FINETUNE_REQUIRE_SLURM"
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``; fail instead under DIST_FINETUNE_REQUIRE_SLURM=1, where these tests must run."""
    if os.environ.get(REQUIRE_VARIABLE, "0") not in ("", "0"):
        pytest.fail(f"{reason} (and {REQUIRE_VARIABLE}={os.environ[REQUIRE_VARIABLE]} requires these tests to run)",
                    pytrace=False)
    pytest.skip(reason)


def missing_requirements() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    if os.environ.get("DIST_FINETUNE_SKIP_SLURM"):
        return "DIST_FINETUNE_SKIP_SLURM is set"
    if not Path("/proc/self/environ").exists():
        return f"needs Linux /proc; {ENABLE_HINT}"
    if os.geteuid() != 0:
        return f"needs root (slurmd runs jobs); {ENABLE_HINT}"
    missing = [p for p in DAEMONS + CLIENTS + ("munge", "unmunge") if shutil.which(p) is None]
    if missing:
        return f"missing {', '.join(missing)}; {ENABLE_HINT}"
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block(count: int, low: int = 12000, high: int = 19900) -> int:
    """First port of ``count`` consecutive free TCP ports, chosen at random in [low, high).

    The range sits below the kernel's ephemeral ports and below the 20000-29999 band that the
    sbatch scripts derive their rendezvous port from.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports in [{low}, {high})")


def _loopback_addr() -> tuple[str, bool]:
    """(address the daemons talk on, whether to bind only to it).

    Slurm's NoInAddrAny binds to the address gethostname() resolves to; that is only safe when the
    host name resolves to loopback. Otherwise listen on all addresses and talk via 127.0.0.1.
    """
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = ""
    if addr.startswith("127."):
        return addr, True
    return "127.0.0.1", False


class LocalSlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd on this host, in ``base`` (a private directory)."""

    def __init__(self, base: Path, nodes: int = 2, cpus: int | None = None):
        self.base = Path(base)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.base / "etc" / "slurm.conf"
        self.socket = self.base / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a cluster we run inside must not leak into ours
                del self.env[var]

    # ---------------------------------------------------------------- bring-up / teardown
    def start(self, timeout: float = 30.0) -> "LocalSlurmCluster":
        if len(str(self.socket)) > 100:  # sun_path is 108 bytes
            raise RuntimeError(f"cluster dir too long for a unix socket path: {self.base}")
        for sub in ("etc", "state", "log", "run", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.base / "munge", 0o755)
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            ["munged", "-F", "--force", "-S", str(self.socket), f"--key-file={key}",
             f"--pid-file={self.base}/munge/munged.pid", f"--log-file={self.base}/munge/munged.log",
             f"--seed-file={self.base}/munge/munged.seed"],
        )
        self._wait_for(lambda: self.socket.exists(), 10, "munged socket")
        cred = subprocess.run(["munge", "-S", str(self.socket), "-n"], capture_output=True, check=True)
        subprocess.run(["unmunge", "-S", str(self.socket)], input=cred.stdout, capture_output=True,
                       check=True)

        self.port = free_port_block(len(self.nodes) + 2)
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

        def all_idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.base}/log")
            out = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False).stdout
            return set(out.split()) >= set(self.nodes)

        self._wait_for(all_idle, timeout, "all nodes idle")
        return self

    def stop(self) -> None:
        """Cancel jobs, then stop every process this cluster started, by PID."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run(
                    ["squeue", "-h", "-o", "%A"], check=False
                ).stdout.split():
                    time.sleep(0.2)
        for name in [n for n in self.procs if n.startswith("slurmd-")]:
            self._terminate(self.procs.pop(name))
        for pid in self._leftover_pids():  # slurmstepd ignores SIGTERM; job processes get KILL too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in ("slurmctld", "munged"):
            if name in self.procs:
                self._terminate(self.procs.pop(name))

    def _leftover_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        keep = set()
        pid = os.getpid()
        while pid > 1:  # never this process or its ancestors
            keep.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in keep:
                continue
            try:
                environ = (d / "environ").read_bytes().split(b"\0")
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if marker in environ and (
                comm == "slurmstepd" or any(e.startswith(b"SLURMD_NODENAME=") for e in environ)
            ):
                found.append(int(d.name))
        return found

    @staticmethod
    def _terminate(proc: subprocess.Popen, wait: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True,
        )
        log.close()

    @staticmethod
    def _wait_for(cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise TimeoutError(f"local SLURM: timed out waiting for {what}")

    def _slurm_conf(self) -> str:
        addr, bind_loopback = _loopback_addr()
        mem_mb = 1024
        try:
            meminfo = Path("/proc/meminfo").read_text()
            mem_mb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) // 1024
        except (OSError, AttributeError):
            pass
        b = self.base
        lines = [
            "ClusterName=dftest",
            f"SlurmctldHost=localhost({addr})",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny" if bind_loopback else "",
            f"SlurmctldPort={self.port}",
            f"SlurmdPort={self.port + 1}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again
            f"AuthInfo=socket={self.socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=30",  # SLURM's default: under load, two ranks saving take more than a few seconds
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for i, node in enumerate(self.nodes, start=2):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr={addr} Port={self.port + i} "
                f"CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(line for line in lines if line) + "\n"

    # ---------------------------------------------------------------- using the cluster
    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, **kw)

    def sbatch(self, args: list[str], env: dict | None = None, **kw) -> str:
        """Submit with ``sbatch --parsable ARGS``; returns the job id."""
        merged = dict(self.env, **(env or {}))
        out = self.run(["sbatch", "--parsable", *args], env=merged, **kw).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller forgot the job)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 120.0, states=FINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; returns its last ``scontrol`` record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info}")

    def logs(self) -> str:
        """Tail of the daemons' logs, for assertion messages."""
        parts = []
        for f in sorted((self.base / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running 2-node local cluster for the session, or a skip saying how to enable it (a failure
    under DIST_FINETUNE_REQUIRE_SLURM=1; a cluster that does not start is always an error)."""
    reason = missing_requirements()
    if reason:
        skip_or_fail(f"local SLURM cluster unavailable: {reason}")
    base = Path(tempfile.mkdtemp(prefix="dfslurm-", dir="/tmp"))
    cluster = LocalSlurmCluster(base, nodes=2)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("DIST_FINETUNE_KEEP_SLURM"):
            shutil.rmtree(base, ignore_errors=True)
