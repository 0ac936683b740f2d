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
import os
import shutil
import signal
import sys
from pathlib import Path

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


if __name__ == "__main__":
    main()
