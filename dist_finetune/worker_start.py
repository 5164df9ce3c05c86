"""How DataLoader workers start: forked, except where a forked worker can hang for good.

CPython before 3.10.15 and 3.11.10 (gh-112275) lets a child forked while another thread holds the
interpreter's thread-list lock inherit it locked; the child then waits on it forever inside
``os.fork``, before any of our code runs. A process in a torch.distributed process group has such
threads: gloo's and NCCL's C++ threads take that lock each time they enter Python. A 2-rank CPU run
hung this way (a validation worker of rank 1 never started; rank 0 waited for it in a collective).
So on those Pythons, a process in a process group starts its loader workers from a forkserver: a
process started by exec, with no other threads, that preloads the dataset's module and forks the
workers. The dataset then reaches each worker pickled, once per worker start.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext

import torch.distributed as dist

FORK_FIXED_IN = {(3, 10): 15, (3, 11): 10}  # first patch release with gh-112275's fix; 3.12 has it


def fork_can_hang(version: tuple = tuple(sys.version_info[:3])) -> bool:
    """Whether this Python's forked children can inherit the thread-list lock held (gh-112275)."""
    fixed_in = FORK_FIXED_IN.get(tuple(version[:2]))
    return fixed_in is not None and version[2] < fixed_in


def worker_context(num_workers: int, dataset: object,
                   version: tuple = tuple(sys.version_info[:3])) -> BaseContext | None:
    """The ``multiprocessing_context`` for a DataLoader of ``dataset``: None (the platform's
    default) unless its workers would be forked from a process-group member on an affected Python."""
    if num_workers == 0 or not fork_can_hang(version) or not (dist.is_available() and dist.is_initialized()):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([type(dataset).__module__])  # takes effect when the forkserver starts
    return context
