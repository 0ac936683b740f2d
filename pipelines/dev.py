"""Start ``dagster dev`` for this code location, safely, from a terminal or a script.

    python -m pipelines.dev [--port 3000] [--host 127.0.0.1]

Why a wrapper: a process started in the background by a non-interactive shell inherits SIGINT (and
under some supervisors SIGTERM) as *ignored*, and ``exec`` keeps ignored signals ignored, so a
backgrounded ``dagster dev`` could not be stopped by its PID. This restores the default handlers and
then replaces itself with ``dagster dev`` (same PID, so ``kill $!`` works). It also makes sure
``$DAGSTER_HOME`` exists (default ``.dagster_home`` in the checkout) with telemetry off, and binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def prepare_home(home: Path) -> Path:
    """Create ``home`` with ``pipelines/dagster.yaml`` (telemetry off) unless it has a dagster.yaml."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copy(REPO / "pipelines" / "dagster.yaml", config)
    return home


def dev_command(host: str, port: int) -> list[str]:
    """``dagster dev`` without -m: run from the checkout, it reads ``[tool.dagster]`` in pyproject.toml,
    which names the code location ``qis_fhir`` (with -m it would be named after the module)."""
    return [str(Path(sys.executable).with_name("dagster")), "dev", "-h", host, "-p", str(port)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.dev", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="web UI port (default 3000)")
    args = parser.parse_args(argv)

    home = prepare_home(Path(os.environ.get("DAGSTER_HOME") or REPO / ".dagster_home").resolve())
    os.environ["DAGSTER_HOME"] = str(home)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    cmd = dev_command(args.host, args.port)
    os.chdir(REPO)
    os.execv(cmd[0], cmd)



# ---------------------------------------------------------------------- from a program (demo, tests)
START_DEADLINE = 120.0  # dagster dev loads the code location in a subprocess: ~15 s on a quiet 2-core machine
STOP_DEADLINE = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_dev(home: Path, port: int, log: Path, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> subprocess.Popen:
    """``python -m pipelines.dev`` on ``home`` in a session of its own (so a terminal's Ctrl-C meant for the
    caller does not reach it half-way), output to ``log``; stop it with :func:`stop_dev`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.dev", "--host", host, "--port", str(port)],
            cwd=REPO, env={**os.environ, **(env or {}), "DAGSTER_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_ui(url: str, proc: subprocess.Popen, deadline: float = START_DEADLINE) -> None:
    """Poll ``url`` (``.../server_info``) until it answers 200; RuntimeError if ``proc`` exits, TimeoutError at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)  # poll interval, bounded by the deadline above
    raise TimeoutError(f"{url} did not answer within {deadline:.0f} s")


def stop_dev(proc: subprocess.Popen, deadline: float = STOP_DEADLINE) -> list[str]:
    """SIGTERM the session of ``proc`` (dagster dev, its webserver, daemon and code server), wait, SIGKILL
    what is left by process id, and return what had to be killed (``pid name``; empty when all stopped).

    The descendants are listed before the signal, so a child that re-parented itself is still checked."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=deadline)
    left = [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)
    return left


if __name__ == "__main__":
    main()
