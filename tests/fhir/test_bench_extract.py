"""The extract bench section times every contender interleaved over the same slices of one export."""

from __future__ import annotations

import pytest

from qis_fhir.bench import extract
from qis_fhir.bench.commands import BenchOptions

pytestmark = pytest.mark.timeout(120)


def test_extract_bench_interleaves_contenders_over_the_same_lines():
    r = extract.run(BenchOptions(observations=5000))
    inter = r["interleaved"]
    n = r["observations"]
    assert 5000 <= n <= 5000 * 1.01
    # The export is cut into MIN_SLICES part files, timed over enough rounds to reach MIN_TIMED_SLICES.
    assert inter["slices"] % extract.MIN_SLICES == 0 and inter["slices"] >= extract.MIN_TIMED_SLICES
    rounds = inter["rounds"]
    assert inter["slices"] == rounds * extract.MIN_SLICES
    # orjson and both extraction modes were timed over every line in every round: same work, same drift.
    timed = inter["lines_timed"]
    assert timed["orjson"] == timed["qis"] == timed["qis_off"] == n * rounds
    assert 0 < timed["pydantic"] <= n * rounds // extract.PYDANTIC_MIN_STEP + inter["slices"]
    assert r["pydantic_sample"] == timed["pydantic"]
    # Ratios are the ones of the reported rates (one run), not of separately taken figures.
    assert r["qis_vs_orjson"] == pytest.approx(r["qis_per_s"] / r["orjson_per_s"], abs=0.002)
    assert r["qis_off_vs_orjson"] == pytest.approx(r["qis_off_per_s"] / r["orjson_per_s"], abs=0.002)
    assert r["qis_vs_pydantic"] == pytest.approx(r["qis_per_s"] / r["pydantic_per_s"], abs=0.1)
    assert 0 < inter["extract_call_overhead_ms"] and 0 < inter["extract_overhead_share"] < 1
    # The whole-export child extracted everything once: every line read, sample validated, none lost.
    assert r["quarantined"] == 0 and r["validated"] > 0 and r["peak_rss_mib"] > 0
    parts = r["parts_us_per_line"]
    assert all(parts[k] > 0 for k in ("orjson_us", "msgspec_us", "validation_sampled_us"))
    assert r["fast_parse_vs_orjson"] == pytest.approx(parts["msgspec_us"] / parts["orjson_us"], abs=0.01)
    for key in ("targets", "qis_wall_s", "validation_warmup_s", "bytes_per_line", "rows_observations"):
        assert key in r


def test_extract_bench_times_a_real_exports_observation_lines(fixtures_dir):
    """``--export``: the same interleaved timing on a site's own Observation lines, repeated."""
    r = extract.run(BenchOptions(observations=5000, export=fixtures_dir / "synthea-r4-105"))
    assert r["observations"] == 5000
    assert r["interleaved"]["lines_timed"]["qis"] == 5000 * r["interleaved"]["rounds"]
    # Synthea's own lines: the 64 unit-less BP panels and 30 "(score)" values among the first 5,000
    # lines are quarantined exactly as a normal extraction would
    assert 0 < r["quarantined"] < 5000 and r["qis_per_s"] > 0 and r["bytes_per_line"] > 0


def test_extract_bench_refuses_an_export_without_observations(tmp_path):
    import click

    (tmp_path / "Patient.ndjson").write_text("{}\n")
    with pytest.raises(click.UsageError, match="no Observation"):
        extract.run(BenchOptions(observations=5000, export=tmp_path))
