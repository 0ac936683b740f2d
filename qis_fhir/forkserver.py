"""The stages' worker processes, forked from one fork server that imports their libraries once.

The quality suites and the outcome shards run in pools of worker processes (``worker_pool``). The
workers are forked from a fork server that imported what they need before it forked any of them
(``QUALITY``, ``OUTCOMES``): no worker pays the imports, their pages stay shared with the server
(``gc_freeze``), and the process that runs the pipeline never imports great-expectations. A fork
server, not a plain fork: the caller may hold threads (Dagster's, DuckDB's), and forking those can
deadlock.

One server per run, not per stage (``held``): importing great-expectations costs 3.5-3.7 s of CPU,
and a run that started a server for each quality check paid it twice, serially: its speed-up from
one to two workers was 1.44, against 1.51-1.60 with one server (docs/benchmarks.md). ``qis-fhir run`` holds the
server from the extract's check to the events' check, the outcome shards in between running in its
workers too; a caller that runs one stage alone (a Dagster asset, ``qis-fhir quality``) gets a
server for that call, stopped when the call ends, so nothing of it outlives the stage.

A worker never outlives the run: the pool's workers are killed when the caller stops waiting for
them (Ctrl-C, Dagster's termination of a run), and each worker watches its caller and ends with it
(``_serve``); the server exits once its workers have.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

#: the workers' start method
SERVER = multiprocessing.get_context("forkserver")
#: what the quality workers import: great-expectations (3.5-3.7 s of CPU, ~150 MiB) and the engine
QUALITY = ("great_expectations", "pandas", "pyarrow.parquet", "qis_fhir.fhir.scan", "qis_fhir.quality.engine")
#: what the outcome stage's workers import: its staging pass (DuckDB) and the derivation
OUTCOMES = ("pandas", "pyarrow.parquet", "duckdb", "qis_fhir.outcomes.sharded")
#: imported last: moves what the server imported into the collector's permanent generation
FREEZE = "qis_fhir.gc_freeze"

_lock = threading.Lock()
_holders = 0  # held() calls running in this process (threads): the last one out stops the server


@contextlib.contextmanager
def held(*preload: str) -> Iterator[None]:
    """Keep one fork server for every pool made inside. A server started inside imports ``preload``
    (module names) first; one already running keeps what it imported, so the outermost holder names
    everything the pools inside need. Stopped when the last holder leaves."""
    global _holders
    with _lock:
        if not _holders:
            SERVER.set_forkserver_preload(list(dict.fromkeys([*preload, FREEZE])))  # takes effect when it starts
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if not _holders:
                _stop_server()


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` processes forked from the held server (``held``). Leaving it normally
    waits for its tasks; leaving it on an exception, an interruption included, kills its workers
    first, so a stage stopped midway leaves nothing writing into its run folder."""
    with held():
        pool = ProcessPoolExecutor(max(1, workers), mp_context=SERVER, initializer=_serve, initargs=(os.getpid(),))
        try:
            yield pool
        except BaseException:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def in_worker(fn, *args):
    """``fn(*args)`` in one worker forked from the server: its result, or its exception raised here."""
    with worker_pool(1) as pool:
        return pool.submit(fn, *args).result()


def in_rounds(fn, items: list, workers: int, per_worker: int) -> list:
    """``fn`` of every item, in order, over ``workers`` processes, each serving at most ``per_worker``
    items before a fresh pool replaces it (what a task's allocators keep leaves with its worker). Not
    ``max_tasks_per_child``: on Python 3.11-3.13 that option deadlocks ``ProcessPoolExecutor`` once a
    worker retires with tasks still queued (CPython gh-115634)."""
    per_round = max(1, workers) * per_worker
    out = []
    for start in range(0, len(items), per_round):
        with worker_pool(min(workers, len(items) - start)) as pool:
            out += pool.map(fn, items[start:start + per_round])
    return out


def _serve(caller: int) -> None:
    """A worker's start: a thread that ends the worker as soon as ``caller`` (the process that made
    the pool) ends, mid-task too. Not the kernel's parent-death signal: the worker's parent is the
    server, which outlives the caller as long as a worker holds the server's liveness pipe (every
    worker does), so the two would wait for each other until the task ended."""
    try:
        watched = os.pidfd_open(caller)  # Linux 5.3 and later
    except ProcessLookupError:
        os._exit(1)  # the caller ended before the worker started
    except (AttributeError, OSError):
        return  # elsewhere the worker ends after its task, when its pool's queue closes

    def watch() -> None:
        select.select([watched], [], [])  # readable once the caller has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="qis-fhir caller watch", daemon=True).start()


def _stop_server() -> None:
    """Stop this process's fork server; the next pool starts a new one. The standard library has no
    public call for it: ``ForkServer._stop`` (Python 3.8 and later, used by its own tests) is taken
    where it exists, and the server is left running where it does not."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()
