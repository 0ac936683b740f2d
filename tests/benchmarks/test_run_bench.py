"""The run bench's memory figure is the whole process tree's: a worker's memory is counted."""

from __future__ import annotations

import subprocess
import sys
import time

from qis_fhir.bench.run import TreeSampler

HOLD = 200 * 2**20  # bytes the child touches and holds


def test_the_sampler_counts_a_child_process_memory():
    sampler = TreeSampler()
    sampler.enter("child")
    code = f"import sys; b = bytearray({HOLD}); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # the memory is held from here on
        deadline = time.monotonic() + 10
        while sampler.peaks["child"]["pss"] < HOLD and time.monotonic() < deadline:
            time.sleep(0.05)  # the sampler's period is 0.1 s: poll its figure with a deadline
        sampler.enter("after")
    finally:
        child.communicate("", timeout=10)
    sampler.stop()
    assert sampler.peaks["child"]["pss"] >= HOLD
    assert sampler.peaks["child"]["rss"] >= sampler.peaks["child"]["pss"]
