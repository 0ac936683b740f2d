"""The secagg bench section runs both rounds and reports what docs/benchmarks.md quotes (times are not
asserted: a shared machine's speed is not a test result)."""

from __future__ import annotations

from qis_fhir.bench.commands import BenchOptions
from qis_fhir.bench.secagg import CELLS, run
from qis_fhir.secagg.values import VALUE_FIELDS


def test_secagg_section_reports_both_rounds():
    r = run(BenchOptions(nodes=(4,), seed=1))
    assert (r["sites"], r["threshold"]) == (4, 3)
    assert r["presence"]["vector_elements"] == CELLS and r["value"]["vector_elements"] == CELLS * len(VALUE_FIELDS)
    for stage in ("presence", "value"):
        # a site publishes at least its masked vector, and every site the same amount (same roster, same length)
        assert r[stage]["site_bytes_median"] == r[stage]["site_bytes_max"] > r[stage]["masked_vector_bytes"]
        assert r[stage]["unmask_cpu_s"] > 0
