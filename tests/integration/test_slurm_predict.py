"""The SLURM batch scripts' `predict` subcommand, with the fake srun/scontrol/accelerate of
``test_slurm_scripts``: the same launcher on every node, ``-m dist_finetune predict ARGS`` and no
``--resume``; without the subcommand the scripts still train."""

from __future__ import annotations

import pytest
import signal

from test_slurm_scripts import MULTI, PORT, SINGLE, _wait_files, fake  # noqa: F401  (fake: the fixture)

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


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single_node", "multi_node"])
def test_prediction_is_not_requeued_on_the_exit_code_training_requeues_on(fake, script):  # noqa: F811
    """Exit 42 (a worker stopped by a signal sent to it directly) requeues training; a prediction would start over."""
    r = fake.run(script, "predict", *PREDICT, FAKE_EXIT=42)
    assert r.rc == 42 and r.requeues == [], r.out
    assert "prediction failed with exit code 42" in r.out


@pytest.mark.parametrize("script, nodes", [(SINGLE, 1), (MULTI, 2)], ids=["single_node", "multi_node"])
def test_prediction_at_the_time_limit_warning_is_not_requeued(fake, script, nodes):  # noqa: F811
    """SIGUSR1 to the batch shell (the time-limit warning) requeues training; a prediction stops and says why."""
    proc = fake.start(script, "predict", *PREDICT, nodes=nodes, FAKE_WAIT_SIGNAL=1, FAKE_EXIT=1)
    try:
        _wait_files([fake.dir / f"ready.{i}" for i in range(nodes)], proc)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and not (fake.dir / "requeue.log").exists(), out
    assert "prediction stopped by SIGUSR1 (exit 1), not requeued: resubmit it with a longer --time" in out
