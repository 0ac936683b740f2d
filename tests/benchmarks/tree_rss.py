"""Peak memory of a command's whole process tree: the sum of every descendant's RSS, sampled.

    python tests/benchmarks/tree_rss.py [--interval 0.2] -- COMMAND...

``/usr/bin/time -v`` reports the largest single process's peak ("Maximum resident set size"), which
for ``qis-fhir demo`` (one pipeline process, DHT node processes, with ``--ui`` dagster dev's) misses
what runs beside it; this samples the sum of the tree's RSS every ``--interval`` seconds (a peak
shorter than that can be missed) and prints the peak, the wall time and the exit code as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # ended between the listing and the read
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.monotonic()
    proc = subprocess.Popen(command)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(root))
        except psutil.NoSuchProcess:
            break
        time.sleep(args.interval)  # the sampling period, bounded by the command's own run
    proc.wait()
    print(json.dumps({"exit_code": proc.returncode, "wall_s": round(time.monotonic() - started, 1),
                      "peak_tree_rss_mib": round(peak / 2**20, 1)}), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
