"""The flood benchmark runs end to end: a node flooded with unauthenticated datagrams keeps serving."""

from __future__ import annotations

import pytest

from qis_fhir.bench import dht_flood
from qis_fhir.bench.commands import BenchOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_flooded_node_keeps_answering_clients_and_certified_nodes():
    result = dht_flood.run(BenchOptions())
    assert set(result["by_kind"]) == set(dht_flood.KINDS)
    for kind, r in result["by_kind"].items():
        assert r["handled_by_node"] > r["sent"] // 4, kind  # the flood reached the node and was counted
        assert r["queries"] >= 1 and r["queries_complete"] == r["queries"], kind
        assert r["certified_pings_answered"] == r["certified_pings"] >= 1, kind
