"""The DHT benchmark section runs end to end on a small network and measures what it claims."""

from __future__ import annotations

import pytest

from qis_fhir.bench import dht
from qis_fhir.bench.commands import BenchOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_dht_bench_reports_recall_time_ratio_and_hops():
    result = dht.run(BenchOptions(nodes=(10,)))
    r = result["by_nodes"]["10"]
    assert r["nodes"] == 10
    for mode in ("exhaustive", "quorum3"):
        assert r["ours"][mode]["recall"] == 1.0  # every site's packet for every fingerprint
        assert r["ours"][mode]["time_ratio_vs_stock"] > 0 and r["ours"][mode]["hops_max"] >= 1
    assert r["recall_stock"] == pytest.approx(1 / dht.SITES)  # one value per key: one site of five
    assert r["ours_publish"]["unconfirmed"] == 0
    assert r["log2_n"] == pytest.approx(3.32, abs=0.01)
    burst = result["burst"]
    assert burst["bounded"]["confirmed"] == burst["bounded"]["packets"] == dht.BURST_FINGERPRINTS * dht.SITES
