"""The SLURM batch scripts' `predict` subcommand, with the fake srun/scontrol/accelerate of
``test_slurm_scripts``: the same launcher on every node, ``-m dist_finetune predict ARGS`` and no
``--resume``; without the subcommand the scripts still train."""

from __future__ import annotations

import pytest
from test_slurm_scripts import MULTI, PORT, SINGLE, fake  # noqa: F401  (fake: the fixture)

PREDICT = ["--checkpoint", "runs/exp1/model.safetensors", "data/my photos", "--output", "preds.csv"]


def test_single_node_predict(fake):  # noqa: F811
    r = fake.run(SINGLE, "predict", *PREDICT, GPUS_PER_NODE=2)
    assert r.rc == 0, r.out
    assert r.argv(0) == ["launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", PORT,
                         "-m", "dist_finetune", "predict", *PREDICT]
    assert r.node(0)["usr1_ignored"] and "prediction finished" in r.out


def test_multi_node_predict(fake):  # noqa: F811
    r = fake.run(MULTI, "predict", *PREDICT, nodes=2, SLURM_GPUS_ON_NODE=4)
    assert r.rc == 0, r.out
    for rank in (0, 1):
        assert r.argv(rank) == [
            "launch", "--machine_rank", str(rank), "--multi_gpu", "--num_machines", "2", "--num_processes", "8",
            "--main_process_ip", "10.1.0.1", "--main_process_port", PORT, "-m", "dist_finetune", "predict", *PREDICT,
        ]


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single_node", "multi_node"])
def test_failed_prediction_is_reported_as_such(fake, script):  # noqa: F811
    r = fake.run(script, "predict", *PREDICT, FAKE_EXIT=3)  # e.g. --strict with unreadable files
    assert r.rc == 3 and r.requeues == [], r.out
    assert "prediction failed with exit code 3" in r.out
    assert r.argv(0)[-len(PREDICT) - 1:] == ["predict", *PREDICT]
