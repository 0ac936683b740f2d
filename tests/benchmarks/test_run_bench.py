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


def test_a_sizes_figures_are_the_median_of_its_runs(monkeypatch):
    """The smallest size also runs in the speed-up pairs, every other size as many times alone; a
    size's time per Observation is the median over its one-worker runs (one noisy run does not decide
    the spread), its peak the largest."""
    from qis_fhir.bench import run as bench

    # calls: 1 worker, then the pairs (1, 2), (2, 1), (1, 2); the last three are the larger size's runs
    cpu = iter([60.0, 50.0, 30.0, 31.0, 52.0, 70.0, 29.0, 80.0, 100.0, 60.0])
    peak = iter([500, 520, 700, 710, 560, 510, 690, 530, 540, 535])

    def fake_run(args):
        return {"total": {"cpu_s": next(cpu), "wall_s": 10.0 * args["workers"], "peak_pss_mib": next(peak)},
                "observations_read": 1_000_000, "stages": {}}

    monkeypatch.setattr(bench, "_run_child", fake_run)
    monkeypatch.setattr("qis_fhir.synth.generate_export", lambda *a, **k: None)
    monkeypatch.setattr(bench, "_network", lambda tmp: None)
    out = bench.measure((1_000_000, 4_000_000), repeats=3)
    small, large = out["sizes"]["1000000"], out["sizes"]["4000000"]
    assert small["runs"] == 4 and small["us_per_observation"]["cpu"] == 56.0  # median of 60, 50, 52, 70
    assert small["peak_pss_mib_max"] == 560  # the two-worker runs' peaks are not this size's one-worker figure
    assert large["runs"] == 3 and large["us_per_observation"]["cpu"] == 80.0  # median of 80, 100, 60, over 1,000,000 read
    assert large["peak_pss_mib_max"] == 540
    assert out["speedup"]["pairs"] == [0.5, 0.5, 0.5]
