"""The bench section runs and reports what `qis-fhir bench` promises (rates are not asserted: a shared
machine's speed is not a test result; the figures go to docs/benchmarks.md)."""

from __future__ import annotations

from qis_fhir.bench.commands import BenchOptions
from qis_fhir.bench.packets import run


def test_packets_section_reports_rates_and_sizes():
    r = run(BenchOptions(seed=1))
    for key in ("sign_per_s", "verify_per_s", "verify_repeat_per_s", "raw_ed25519_sign_per_s", "raw_ed25519_verify_per_s"):
        assert r[key] > 0, key
    assert r["size_bytes_min"] <= r["size_bytes_median"] <= r["size_bytes_p99"] <= r["size_bytes_max"] <= 512
    assert r["packets"] == 5000
