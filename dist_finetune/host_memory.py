"""CPU runs: let glibc's malloc keep freed memory for the next step instead of returning it to the OS.

By default glibc serves every large block with a fresh ``mmap`` and unmaps it on ``free`` (and trims
the heap's free top), so each training or prediction step page-faults and zero-fills its
activations anew. On a CPU that can cost as much as the convolutions: EfficientNet-Lite0 at 224 px
on 2 cores trained its frozen epochs at 40 img/s with glibc's defaults and at 74 with freed memory
kept (unfrozen 19 -> 23; README, Defaults and Performance). PyTorch's CPU tuning guides preload
jemalloc or tcmalloc for this; raising glibc's mmap and trim thresholds does the same without
another library. The cost: the process keeps its peak heap, which a training loop reaches again
every step. Results do not change (the same val accuracy and loss to the last digit).

A process that chose its allocator (``LD_PRELOAD``) or glibc's settings (``MALLOC_*_`` variables,
``GLIBC_TUNABLES``) is left as it is; so is any libc but glibc.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**31 - 1  # mallopt takes a C int: blocks up to 2 GiB come from the heap and stay there
_ENVIRONMENT = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state: str | None = None  # what the first call did; the setting is process-wide, made once


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done, for the log."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    chosen = [name for name in _ENVIRONMENT if os.environ.get(name)]
    if chosen:
        return f"left as the environment sets it ({', '.join(chosen)})"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: other libcs have no mallopt or other semantics
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left as it is (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) != 1:
        return "left as it is (glibc refused the thresholds)"
    return "keeps freed memory for reuse (glibc mmap and trim thresholds raised)"
