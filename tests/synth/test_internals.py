"""The generator's contracts with the rest of qis-fhir: mapping v1 agreement, fast paths, flat memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import orjson

from qis_fhir.fhir.systems import RXNORM, SNOMED
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.synth import catalogue as cat
from qis_fhir.synth import generate_export
from qis_fhir.synth import generator as gen
from qis_fhir.synth import resources as fhir


def test_catalogue_codes_and_timeline_agree_with_mapping_v1() -> None:
    m = load_mapping(MAPPINGS_ROOT / "v1")
    assert [b.label for b in m.cohorts.age_bands] == [label for label, _, _ in cat.AGE_BANDS]
    assert [(b.min_years, b.max_years) for b in m.cohorts.age_bands] == [(lo, hi) for _, lo, hi in cat.AGE_BANDS]
    for bucket in cat.BUCKETS:
        codes = [bucket.snomed] + ([bucket.alt_code[0]] if bucket.alt_code else [])
        for code in codes:
            assert m.bucket_for(SNOMED, code) == bucket.key
        measure = m.measures[bucket.measure.key]
        assert measure.id in m.buckets[bucket.key].measures
        assert (measure.loinc, measure.unit, measure.direction, measure.threshold) == (
            bucket.measure.loinc, bucket.measure.unit, bucket.measure.direction, bucket.measure.response_threshold)
        if bucket.measure.panel:
            assert bucket.measure.panel[0] in measure.panels and cat.BP_PANEL_ALT[0] in measure.panels
        for t in bucket.treatments:
            assert m.treatment_for(RXNORM, t.rxnorm) == t.tx_code
            assert bucket.key in m.treatments[t.tx_code].buckets
        # the planted timeline must put exactly one baseline and one follow-up inside the windows
        assert gen.BASELINE_DAYS[1] < measure.baseline_days < gen.DIAGNOSIS_VALUE_MIN_DAYS
        assert measure.followup_min_days <= gen.FOLLOWUP_DAYS[0]
        assert gen.FOLLOWUP_DAYS[1] <= measure.followup_max_days < gen.LATE_DAYS[0]
        assert gen.REFILL_DAYS[1] < measure.episode_gap_days  # refills continue one episode


def test_vital_templates_write_the_same_bytes_as_the_dict_path() -> None:
    tm = fhir.VitalTemplates()
    ts = 1_560_000_000
    for code, display, unit, _, _ in cat.ROUTINE_VITALS:
        for value in (72.0, 80.5, 0.1, 123.4):
            expected = orjson.dumps(fhir.vital("abc-1", "pat-9", None, code, display, unit, ts, value))
            got = tm.template(code, display, unit) % {
                b"o": b"abc-1", b"p": b"pat-9", b"t": fhir.iso(ts).encode(), b"m": fhir.iso_ms(ts).encode(),
                b"v": repr(value).encode()}
            assert got == expected
    assert fhir.iso(ts) == "2019-06-08T13:20:00+00:00"


def test_memory_stays_flat_as_observations_grow(tmp_path: Path) -> None:
    def peak(n: int, name: str) -> int:
        tracemalloc.start()
        try:
            generate_export(tmp_path / name, patients=50, seed=3, observations=n)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = peak(5_000, "small")
    large = peak(60_000, "large")
    assert large < small + 2 * 1024 * 1024, (small, large)
