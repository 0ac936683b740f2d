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
    floors = r["floors_us_per_line"]
    assert all(floors[k] > 0 for k in ("orjson_us", "hmac_key_us", "sample_crc_us", "validation_sampled_us"))
    assert 0 < r["bound_vs_orjson_sample"] < r["bound_vs_orjson_off"] < 1
    for key in ("targets", "qis_wall_s", "validation_warmup_s", "bytes_per_line", "rows_observations"):
        assert key in r
