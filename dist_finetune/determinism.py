"""Bit-exact runs on a GPU: ``deterministic=True`` (``--deterministic``), at a cost in speed.

On the CPU the same seed gives bit-identical weights and a resume continues bit-exactly as things
are. On CUDA three things break that by default: cuDNN benchmarks candidate kernels and keeps the
fastest (``cudnn.benchmark``, which the trainer turns on for speed; another run may pick another
kernel), convolutions run in TF32, and some backward kernels accumulate with atomics in a varying
order (adaptive average pooling, scatter/index_add, ...). Deterministic mode turns all three off
and makes torch raise on any operation that has no deterministic implementation.
"""

from __future__ import annotations

import os
import warnings

import torch

CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels everywhere when asked; call before CUDA starts (cuBLAS reads its setting then).

    ``deterministic=False`` changes nothing: the trainer keeps cuDNN's benchmark for speed. The flags are
    torch's process-wide ones and stay set for the rest of the process (README says so).
    """
    if not deterministic:
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn(f"deterministic=True but CUDA started before CUBLAS_WORKSPACE_CONFIG was set: cuBLAS may "
                          f"not be deterministic in this process. Export CUBLAS_WORKSPACE_CONFIG="
                          f"{CUBLAS_WORKSPACE_CONFIG} before starting Python")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
