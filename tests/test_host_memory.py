"""On a CPU, a large block freed by one step is kept for the next, not unmapped and page-faulted anew;
a process that chose its own allocator settings is left as it is. Each case runs in a fresh process,
since the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist_finetune")
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, sys.argv[1])  # host_memory is a leaf module: no need to import torch for it
    from host_memory import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    SIZE = 64 << 20  # a step's activation: above glibc's largest automatic mmap threshold (32 MiB)

    def step():
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        mapped = libc.mallinfo2().hblkhd  # bytes malloc holds in mmapped blocks (unmapped again on free)
        libc.free(block)
        return {"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks}

    before = step()
    state = keep_freed_memory()
    print(json.dumps({"state": state, "again": keep_freed_memory(), "before": before, "after": [step(), step()]}))
""")


def probe(**environment) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD",
                                                                                             "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", PROBE, PACKAGE], env={**env, **environment}, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def test_freed_blocks_stay_in_the_heap_for_the_next_step():
    found = probe()
    size = 64 << 20
    assert found["state"] == found["again"] == "keeps freed memory for reuse (glibc mmap and trim thresholds raised)"
    assert found["before"]["mapped"] >= size  # glibc's default: its own mapping, returned to the OS on free
    for after in found["after"]:
        assert after["mapped"] < size  # now from the heap ...
        assert after["free_in_heap"] >= size  # ... and kept there once freed, for the next step to reuse


def test_a_process_that_chose_its_allocator_settings_is_left_alone():
    found = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert found["state"] == "left as the environment sets it (MALLOC_TRIM_THRESHOLD_)"
    assert all(after["mapped"] >= 64 << 20 for after in found["after"])  # still glibc's default behaviour
