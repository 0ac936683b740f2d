"""Give the memory a stage freed back to the operating system before the next stage starts, or run
the stage where what it keeps goes away with the process.

The stages run one after another in one process, and the allocators keep what a stage freed for
reuse: after the outcome stage on a 2-million-Observation extract the process held 485 MiB, of which
Arrow's allocator (mimalloc) returned 164 MiB on ``release_unused`` and glibc's ``malloc_trim``
another 48 MiB, leaving 273 MiB. Kept, that memory sits beside the next stage's peak (the quality
workers), so the run's peak grows by it.

What the allocators will not give back, ``in_child`` leaves behind: the work runs in a forked child
and only its result comes back. Measured on a synthetic export of 20 million Observations, the
pipeline's process held 219 MiB after extracting it in process against 166 MiB at 2 million, and
315 MiB against 208 MiB after the outcome stage, although both stages stream: pandas', DuckDB's and
Python's heaps keep what they once used, in pieces no trim returns. Forked, not spawned: the child
shares the parent's imported modules instead of loading its own (~130 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

#: the start method of the stages' child processes (module docstring)
FORK = multiprocessing.get_context("fork")
T = TypeVar("T")


def in_child(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a forked child process: its result (pickled back) or its exception. The child
    may start processes of its own (the outcome stage's workers)."""
    with ProcessPoolExecutor(1, mp_context=FORK) as pool:
        return pool.submit(fn, *args).result()


def release_free_memory() -> None:
    """Return the free memory of Arrow's pool and of the C heap (glibc only) to the system."""
    if "pyarrow" in sys.modules:  # nothing to release if Arrow was never loaded
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # a libc without malloc_trim (musl): nothing to trim
            log.debug("malloc_trim is not available")
