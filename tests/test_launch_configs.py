"""The accelerate config files in launch_configs/: they load with accelerate's own loader and carry the
fields their names promise. Under ``accelerate launch``: integration/test_launch_configs_ranks.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import ComputeEnvironment, DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch_configs"
EXPECTED = {"single_gpu.yaml", "multi_gpu_bf16.yaml", "multi_node.yaml", "cpu_2proc.yaml",
            "fsdp2.yaml"}


def load(name: str) -> ClusterConfig:
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    return cfg


# ---------------------------------------------------------------- the files as data
def test_all_configs_present():
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerate(name):
    assert load(name).num_processes >= 1  # accelerate's own loader accepts every shipped file


def test_single_gpu():
    cfg = load("single_gpu.yaml")
    assert cfg.distributed_type == DistributedType.NO
    assert cfg.num_processes == 1 and cfg.num_machines == 1
    assert cfg.gpu_ids == "all"  # never pin a GPU id the scheduler did not give us
    assert not cfg.use_cpu


def test_multi_gpu_bf16():
    cfg = load("multi_gpu_bf16.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.mixed_precision == "bf16"
    assert cfg.num_machines == 1 and cfg.num_processes >= 2
    assert cfg.gpu_ids == "all"
    assert cfg.main_process_port == 0  # free port: parallel runs on one machine do not collide
    assert not cfg.use_cpu


def test_multi_node_has_every_field_a_slurm_script_fills_in():
    cfg = load("multi_node.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_machines >= 2
    assert cfg.num_processes % cfg.num_machines == 0 and cfg.num_processes > cfg.num_machines
    assert cfg.machine_rank == 0
    assert cfg.main_process_ip and isinstance(cfg.main_process_port, int) and cfg.main_process_port > 0
    assert cfg.rdzv_backend == "static"
    text = (CONFIGS / "multi_node.yaml").read_text()
    for field in ("num_machines", "num_processes", "machine_rank", "main_process_ip",
                  "main_process_port"):
        line = next(ln for ln in text.splitlines() if ln.startswith(field + ":"))
        assert "PLACEHOLDER" in line, f"{field} should be marked as a placeholder"


def test_cpu_2proc():
    cfg = load("cpu_2proc.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU  # the multi-process launcher
    assert cfg.use_cpu
    assert cfg.num_processes == 2 and cfg.num_machines == 1
    assert cfg.main_process_port == 0
    assert cfg.mixed_precision == "no"
    assert "ACCELERATE_USE_CPU=1" in (CONFIGS / "cpu_2proc.yaml").read_text()


def test_fsdp2():
    cfg = load("fsdp2.yaml")
    assert cfg.distributed_type == DistributedType.FSDP
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True
    assert not fsdp["fsdp_offload_params"]
    assert cfg.mixed_precision == "bf16"
    text = (CONFIGS / "fsdp2.yaml").read_text()
    assert "freeze_unfreeze" in text and "fsdp_version must be 2" in text  # documents every strategy working
