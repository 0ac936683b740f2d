"""The evidence benchmark section runs end to end on a small network and measures what it claims."""

from __future__ import annotations

import pytest

from qis_fhir.bench import evidence
from qis_fhir.bench.commands import BenchOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_evidence_bench_pools_every_cell_and_finds_every_packet(monkeypatch):
    monkeypatch.setattr(evidence, "POOL_SITES", 4)
    monkeypatch.setattr(evidence, "POOL_CELLS", 120)
    result = evidence.run(BenchOptions(nodes=(8,)))
    pooling, stage = result["pooling"], result["stage"]
    assert (pooling["cells"], pooling["packets"]) == (120, 480)
    assert stage["nodes"] == 8 and stage["cohorts_queried"] == 80
    assert stage["packets_used"] == stage["packets_published"] == evidence.STAGE_SITES * 120
    assert stage["recall"] == 1.0
