"""The exit path of a 2-rank gloo job, run many times: ``python exit_worker.py RUNS OUT``.

Imports torch once, then forks RUNS pairs of ranks. Each rank joins the group the way the package
does (``make_accelerator``, which registers the exit-time ``shutdown``), trains a few DDP steps
with one DDP rebuild (an unfreeze), leaves them in a reference cycle as a finished run does, and
exits the normal way: atexit handlers, interpreter finalisation, static destructors. Its last atexit handler
(registered first) writes which gloo threads are still running after ``shutdown``. Writes
``OUT/summary.json``: every run's two exit codes and the threads each rank saw.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
from pathlib import Path

import torch

from dist_finetune.distributed import DDPResync, make_accelerator


def gloo_threads() -> list[str]:
    """Names of this process's native threads that belong to gloo (its workers and transport loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as handle:
            names.append(handle.read().strip())
    return sorted(name for name in names if "gloo" in name)


def train_a_little() -> None:
    accelerator = make_accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    resync = DDPResync(accelerator, model)
    for step in range(4):
        if step == 2:
            accelerator.unwrap_model(model)[0].requires_grad_(True)
            model = resync()
        accelerator.backward(model(torch.randn(4, 8)).sum())
        optimizer.step()
        optimizer.zero_grad()
    accelerator.reduce(torch.ones(1), reduction="sum")
    run = {"accelerator": accelerator, "model": model, "optimizer": optimizer}
    run["itself"] = run  # the run's state in a reference cycle, as a trainer's is: only a collection frees it


def rank(index: int, port: int, report: Path) -> None:
    signal.alarm(300)  # a rank that hangs is killed (SIGALRM) and counted, instead of stalling the test
    atexit.register(lambda: report.write_text(json.dumps(gloo_threads())))  # runs after shutdown
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    train_a_little()
    sys.exit(0)


def free_ports(count: int) -> list[int]:
    """``count`` different ports nothing listens on (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def main(runs: int, out: Path, at_once: int = 3) -> None:
    """``at_once`` jobs run side by side (each on its own port)."""
    summary = []
    for first in range(0, runs, at_once):
        jobs, batch = [], range(first, min(runs, first + at_once))
        for run, port in zip(batch, free_ports(len(batch))):
            reports, children = [out / f"run{run}_rank{index}.json" for index in range(2)], []
            for index in range(2):
                pid = os.fork()
                if pid == 0:
                    rank(index, port, reports[index])
                children.append(pid)
            jobs.append((children, reports))
        for children, reports in jobs:
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
            threads = [json.loads(path.read_text()) if path.is_file() else None for path in reports]
            summary.append({"exit_codes": codes, "gloo_threads_after_shutdown": threads})
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
