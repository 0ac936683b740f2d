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
    assert r["recall_ours"] == 1.0  # every site's packet for every fingerprint
    assert r["recall_stock"] == pytest.approx(1 / dht.SITES)  # one value per key: one site of five
    assert r["ours_publish"]["unconfirmed"] == 0
    assert r["query_time_ratio_ours_over_stock"] > 0 and r["hops_ours_max"] >= 1
    assert r["log2_n"] == pytest.approx(3.32, abs=0.01)
