"""Give the memory a stage freed back to the operating system before the next stage starts, or run
the stage where what it keeps goes away with the process.

The stages run one after another in one process, and the allocators keep what a stage freed for
reuse: after the outcome stage, run in that process, on a 2-million-Observation extract it held 485 MiB, of which
Arrow's allocator (mimalloc) returned 164 MiB on ``release_unused`` and glibc's ``malloc_trim``
another 48 MiB, leaving 273 MiB. Kept, that memory sits beside the next stage's peak (the quality
workers), so the run's peak grows by it.

What the allocators will not give back, ``in_child`` leaves behind: the work runs in a forked child
and only its result comes back. Measured on a synthetic export of 20 million Observations, the
pipeline's process held 219 MiB after extracting it in process against 166 MiB at 2 million, and
315 MiB against 208 MiB after the outcome stage, although both stages stream: pandas', DuckDB's and
Python's heaps keep what they once used, in pieces no trim returns (35 MiB after extracting with
the extraction in a child; the outcome stage now runs in the stages' worker pools, ``forkserver.py``,
for the same reason). Forked, not spawned: the child shares the parent's imported modules
instead of loading its own, and starts in milliseconds. A fork copies only the calling thread; the
stages fork where the process runs no work on threads of its own (DuckDB's connections are closed,
Arrow restarts its thread pool in a child), which the tests run under Dagster too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

#: the start method of the stages' child processes (module docstring)
FORK = multiprocessing.get_context("fork")
T = TypeVar("T")


def in_child(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a forked child process: its result (pickled back), or its exception raised here.

    The child may start processes of its own. It never outlives the
    caller: it is killed when the caller stops waiting for it (Ctrl-C, an exception such as Dagster's
    interruption of a run) and, on Linux, when the caller dies (``PR_SET_PDEATHSIG``), so a terminated
    run leaves nothing writing into its run folder."""
    what = getattr(fn, "__name__", "stage")
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_serve, args=(send, os.getpid(), fn, args), name=f"qis-fhir {what}")
    child.start()
    send.close()
    try:
        try:
            ok, value = receive.recv()
        except EOFError:  # it died without an answer: killed (out of memory?) or crashed
            child.join()
            raise ChildProcessError(f"the child process running {what} exited with code {child.exitcode}") from None
    except BaseException:
        if child.is_alive():
            child.kill()
        child.join()
        raise
    finally:
        receive.close()
    child.join()
    if ok:
        return value
    raise value


def _serve(send: Any, parent: int, fn: Callable[..., Any], args: tuple) -> None:
    """The child's side of ``in_child``."""
    _die_with(parent)
    try:
        answer = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
        e.add_note("(raised in a child process of the stage:)\n" + "".join(traceback.format_tb(e.__traceback__)))
        answer = (False, e)
    try:
        send.send(answer)
    except Exception as e:  # an answer that does not pickle  # noqa: BLE001
        send.send((False, ChildProcessError(f"the child process's answer could not be sent back ({type(e).__name__})")))
    send.close()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(libc, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


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
