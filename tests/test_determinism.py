"""Deterministic mode (dist_finetune/determinism.py): the CUDA flags are set before CUDA starts."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_trainer

from dist_finetune import trainer as trainer_module


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode_sets_the_cuda_flags_before_cuda_starts(deterministic, monkeypatch):
    """On a (faked) CUDA device: by default cuDNN benchmarks and torch's TF32 defaults stay; deterministic=True
    turns benchmark and TF32 off, cuDNN and every op deterministic, and sets cuBLAS's workspace before the
    accelerator starts CUDA."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    fresh_process = ((cudnn, "benchmark", False), (cudnn, "deterministic", False), (cudnn, "allow_tf32", True),
                     (matmul, "allow_tf32", False))
    for module, flag, value in fresh_process:  # the test's own flags; monkeypatch restores the process's
        monkeypatch.setattr(module, flag, value)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **_: calls.append(("algorithms", mode)))

    def cuda_accelerator(*args):
        calls.append(("accelerator starts", os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return SimpleNamespace(device=torch.device("cuda", 0))

    monkeypatch.setattr(trainer_module, "make_accelerator", cuda_accelerator)
    tiny_trainer(deterministic=deterministic)._make_accelerator()
    flags = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    if deterministic:
        assert flags == (False, True, False, False)
        assert calls == [("algorithms", True), ("accelerator starts", ":4096:8")]
    else:
        assert flags == (True, False, True, False)
        assert calls == [("accelerator starts", None)]
