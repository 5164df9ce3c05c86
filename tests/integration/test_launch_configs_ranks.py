"""The CPU launch configs under ``accelerate launch``: distinct gloo ranks, SLURM-style overrides, FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_launch_configs import CONFIGS, ROOT


# prints one JSON line per process; the all_gather proves that the ranks really talk to each other
RANK_SCRIPT = r"""
import json, os, torch
from accelerate import Accelerator
import torch.distributed as dist
a = Accelerator()
ranks = a.gather(torch.tensor([a.process_index])).tolist()
info = {"process_index": a.process_index, "num_processes": a.num_processes,
        "distributed_type": str(a.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "gathered": ranks, "device": str(a.device)}
os.write(1, ("RANKINFO " + json.dumps(info) + "\n").encode())  # one write: lines do not interleave
a.end_training()  # destroys the process group; otherwise gloo may abort at exit (SIGABRT)
"""


# builds the FSDP plugin from the environment accelerate's launcher prepared, and the runner's choice; no GPU
FSDP_PROBE = """
import json, os
from accelerate.utils import FullyShardedDataParallelPlugin
from dist_finetune.distributed import launcher_mixed_precision
from dist_finetune.fsdp import mixed_precision_policy, resolve_sharding, runner_applies_fsdp2
p = FullyShardedDataParallelPlugin()
policy = mixed_precision_policy(launcher_mixed_precision())
with runner_applies_fsdp2():
    hidden = os.environ["ACCELERATE_USE_FSDP"]
print("FSDPINFO " + json.dumps({
    "version": p.fsdp_version, "reshard_after_forward": p.reshard_after_forward,
    "sharding": resolve_sharding(None, freezes=True), "mixed_precision": launcher_mixed_precision(),
    "param_dtype": str(policy.param_dtype), "reduce_dtype": str(policy.reduce_dtype),
    "use_fsdp_while_the_accelerator_is_built": hidden, "use_fsdp_after": os.environ["ACCELERATE_USE_FSDP"]}))
"""


def launch_env(**extra: str) -> dict:
    """This environment without distributed/accelerate settings leaking in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "FSDP_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def accelerate_launch(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    return out


def rank_lines(out: str, tag: str = "RANKINFO") -> list[dict]:
    return [json.loads(line.split(tag + " ", 1)[1]) for line in out.splitlines() if tag + " " in line]


# ---------------------------------------------------------------- the files under accelerate launch
@pytest.mark.distributed
def test_cpu_2proc_gives_two_gloo_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    t0 = time.monotonic()
    out = finish(accelerate_launch(
        ["--config_file", str(CONFIGS / "cpu_2proc.yaml"), str(script)],
        launch_env(ACCELERATE_USE_CPU="1"), tmp_path,
    ))
    ranks = rank_lines(out)
    assert sorted(r["process_index"] for r in ranks) == [0, 1], out
    for r in ranks:
        assert r["num_processes"] == 2
        assert r["backend"] == "gloo"
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["device"].startswith("cpu")
        assert r["gathered"] == [0, 1]
    assert time.monotonic() - t0 < 120


@pytest.mark.distributed
def test_multi_node_yaml_with_slurm_style_overrides(tmp_path):
    """What scripts/slurm_multi_node.sbatch does, without SLURM: two launchers (two "machines") on
    this host, every placeholder of multi_node.yaml overridden on the command line."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    env = launch_env(ACCELERATE_USE_CPU="1")
    procs = [
        accelerate_launch(
            ["--config_file", str(CONFIGS / "multi_node.yaml"), "--machine_rank", str(rank),
             "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), str(script)],
            env, tmp_path,
        )
        for rank in (0, 1)
    ]
    outs = [finish(p) for p in procs]
    ranks = [rank_lines(out) for out in outs]
    # machine_rank 0 runs global rank 0, machine_rank 1 runs global rank 1
    assert [[r["process_index"] for r in rs] for rs in ranks] == [[0], [1]], outs
    for (r,) in ranks:
        assert r["num_processes"] == 2 and r["backend"] == "gloo" and r["gathered"] == [0, 1]


@pytest.mark.distributed
def test_fsdp2_launch_config_selects_the_runners_fsdp2_with_bf16(tmp_path):
    """What `accelerate launch --config_file fsdp2.yaml` hands the process: accelerate's own plugin reads
    version 2; the runner resolves sharding 'fsdp2' with FSDP2's bf16 MixedPrecisionPolicy, and builds its
    Accelerator with accelerate's FSDP hidden (the runner shards per backbone layer itself)."""
    script = tmp_path / "probe.py"
    script.write_text(FSDP_PROBE)
    out = finish(accelerate_launch(
        ["--config_file", str(CONFIGS / "fsdp2.yaml"), "--num_processes", "1", str(script)],
        launch_env(PYTHONPATH=str(ROOT)), tmp_path,
    ))
    (info,) = rank_lines(out, "FSDPINFO")
    assert info == {"version": 2, "reshard_after_forward": True, "sharding": "fsdp2", "mixed_precision": "bf16",
                    "param_dtype": "torch.bfloat16", "reduce_dtype": "torch.float32",
                    "use_fsdp_while_the_accelerator_is_built": "false", "use_fsdp_after": "true"}, out
