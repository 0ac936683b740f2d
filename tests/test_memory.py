"""A stage's work in a forked child: its answer or its error comes back, and the child never
outlives the process that waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from qis_fhir.errors import ExitCode, MappingError
from qis_fhir.memory import in_child


def _fail() -> None:
    raise MappingError("no such measure in the mapping")


def test_the_answer_and_the_error_come_back():
    assert in_child(divmod, 7, 2) == (3, 1)
    with pytest.raises(MappingError, match="no such measure") as caught:
        in_child(_fail)
    assert caught.value.exit_code == ExitCode.MAPPING_INVALID
    assert any("child process" in note for note in caught.value.__notes__)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would


def test_a_child_that_dies_without_answering_is_an_error():
    with pytest.raises(ChildProcessError, match="exited with code -9"):
        in_child(_die)


BLOCK = """
import os, signal, sys, threading
from pathlib import Path
from qis_fhir.memory import in_child

# Ctrl-C as in a terminal, even when this test runs from a shell that started it with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

def block(path):
    Path(path).write_text(str(os.getpid()))
    threading.Event().wait(120)

if __name__ == "__main__":
    in_child(block, sys.argv[1])
"""


def _wait_for(condition, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _child_pid(path) -> int:
    return _wait_for(lambda: path.exists() and path.read_text() and int(path.read_text()))


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["caller killed", "caller interrupted"])
def test_the_child_never_outlives_its_caller(tmp_path, how):
    """Killed (SIGKILL: no clean-up runs), the caller takes the child with it through the kernel;
    interrupted while it waits (Ctrl-C, Dagster's termination of a run), it kills the child itself."""
    script, pid_file = tmp_path / "caller.py", tmp_path / "child.pid"
    script.write_text(BLOCK)
    caller = subprocess.Popen([sys.executable, str(script), str(pid_file)], stderr=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(_child_pid(pid_file))
        assert child.ppid() == caller.pid
        os.kill(caller.pid, signal.SIGKILL if how == "caller killed" else signal.SIGINT)
        caller.wait(timeout=30)
        _wait_for(lambda: _gone(child))
        if how == "caller interrupted":
            assert "KeyboardInterrupt" in caller.stderr.read()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
