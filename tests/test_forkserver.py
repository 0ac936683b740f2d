"""The stages' worker pools: one fork server for everything a run holds it for, stopped after, and
workers that never outlive the process waiting for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from test_memory import _gone, _wait_for

from qis_fhir import forkserver
from qis_fhir.errors import ExitCode, MappingError


def _modules(names: tuple[str, ...]) -> tuple[int, list[bool]]:
    """In a worker: the process that forked it and which of ``names`` it found already imported."""
    return os.getppid(), [n in sys.modules for n in names]


def _server_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "resource_tracker" not in " ".join(p.cmdline())]


def test_pools_held_together_share_one_server_that_imported_their_libraries():
    """Two pools inside one hold (a run's quality check and outcome stage) are forked from one
    server, which imported what both need before it forked them; it is gone when the hold ends."""
    names = ("duckdb", "qis_fhir.outcomes.sharded")
    with forkserver.held(*names):
        first = forkserver.in_worker(_modules, names)
        with forkserver.worker_pool(2) as pool:
            second = list(pool.map(_modules, [names, names]))
        assert first[1] == [True, True]
        assert {parent for parent, _ in second} == {first[0]}
        assert all(found == [True, True] for _, found in second)
        server = psutil.Process(first[0])
        assert server.is_running()
    _wait_for(lambda: _gone(server))
    assert _server_children() == []


def _fail() -> None:
    raise MappingError("no such measure in the mapping")


def test_a_workers_error_comes_back_with_its_type():
    with pytest.raises(MappingError, match="no such measure") as caught:
        forkserver.in_worker(_fail)
    assert caught.value.exit_code == ExitCode.MAPPING_INVALID


BLOCK = """
import os, signal, sys, threading
from pathlib import Path
from qis_fhir.forkserver import in_worker

# Ctrl-C as in a terminal, even when this test runs from a shell that started it with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

def block(path):
    Path(path).write_text(str(os.getpid()))
    threading.Event().wait(120)

if __name__ == "__main__":
    in_worker(block, sys.argv[1])
"""


@pytest.mark.parametrize("how", ["caller killed", "caller interrupted"])
def test_a_worker_never_outlives_its_caller(tmp_path, how):
    """Interrupted while it waits (Ctrl-C, Dagster's termination of a run), the caller kills its
    pool's workers; killed (SIGKILL: no clean-up runs), it takes its server with it, and the kernel
    the worker with the server. Without either, the worker would go on for its whole task."""
    script, pid_file = tmp_path / "caller.py", tmp_path / "worker.pid"
    script.write_text(BLOCK)
    caller = subprocess.Popen([sys.executable, str(script), str(pid_file)], stderr=subprocess.PIPE, text=True)
    try:
        worker = psutil.Process(_wait_for(lambda: pid_file.exists() and pid_file.read_text() and int(pid_file.read_text())))
        assert worker.parent().parent().pid == caller.pid  # forked by the server, which the caller started
        os.kill(caller.pid, signal.SIGKILL if how == "caller killed" else signal.SIGINT)
        caller.wait(timeout=30)
        _wait_for(lambda: _gone(worker))
        if how == "caller interrupted":
            assert "KeyboardInterrupt" in caller.stderr.read()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
