"""The evidence benchmark section runs end to end on a small network and measures what it claims."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qis_fhir.bench import evidence
from qis_fhir.bench.commands import BenchOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_evidence_bench_pools_every_cell_and_finds_every_packet(monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evidence"))
    import types

    import _pooling_stub

    _pooling_stub.install(monkeypatch)  # the pooling test double, until the real module is in the tree
    def write_report(evidence_dir):
        (Path(evidence_dir) / "report.html").write_text("test double")
        return Path(evidence_dir) / "report.html"

    report = types.ModuleType("qis_fhir.evidence.report")  # TEST DOUBLE of the report helper's module
    report.write_report = write_report
    monkeypatch.setitem(sys.modules, "qis_fhir.evidence.report", report)
    monkeypatch.setattr(evidence, "POOL_SITES", 4)
    monkeypatch.setattr(evidence, "POOL_CELLS", 120)
    result = evidence.run(BenchOptions(nodes=(8,)))
    pooling, stage = result["pooling"], result["stage"]
    assert (pooling["cells"], pooling["packets"]) == (120, 480)
    assert stage["nodes"] == 8 and stage["cohorts_queried"] == 80
    assert stage["packets_used"] == stage["packets_published"] == evidence.STAGE_SITES * 120
    assert stage["recall"] == 1.0
