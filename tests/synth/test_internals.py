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


def test_every_total_cholesterol_comes_with_its_ldl(medium_export) -> None:
    """A lipid panel, as a lab reports one: the LDL on the same visit and time, in the same unit,
    total - 75 mg/dL (Friedewald with typical HDL and triglycerides), so v2's lipid_control has both
    readings on one day."""
    panels: dict[tuple, dict[str, tuple[float, str]]] = {}
    for path in sorted(medium_export.out_dir.glob("Observation.*")):
        for line in path.read_bytes().splitlines():
            o = orjson.loads(line)
            code = o["code"]["coding"][0]["code"]
            if code in (cat.CHOLESTEROL.loinc, cat.LDL_LOINC[0]):
                key = (o["subject"]["reference"], o["encounter"]["reference"], o["effectiveDateTime"])
                q = o["valueQuantity"]
                assert code not in panels.setdefault(key, {}), "one value of each per panel"
                panels[key][code] = (q["value"], q["code"])
    assert len(panels) > 1000
    for values in panels.values():
        (total, unit), (ldl, ldl_unit) = values[cat.CHOLESTEROL.loinc], values[cat.LDL_LOINC[0]]
        assert ldl_unit == unit
        expected = max(total * (38.67 if unit == "mmol/L" else 1) - 75, 20) / (38.67 if unit == "mmol/L" else 1)
        assert abs(ldl - expected) <= (0.02 if unit == "mmol/L" else 0.06)
    assert {u for v in panels.values() for _, u in v.values()} == {"mg/dL", "mmol/L"}


def test_v2_lipid_control_reads_the_synthetic_panels(medium_export, tmp_path: Path) -> None:
    """Without LDL every lipid_control unit of a synthetic site had no reading and was 'not
    controlled': the demo published 0 % everywhere. With the panels some statin users are controlled."""
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    extract_export(medium_export.out_dir, tmp_path / "x", secret=b"s" * 32, validate="off")
    s = derive_outcome_events(load_extract(tmp_path / "x"), load_mapping(MAPPINGS_ROOT / "v2")).summary
    lipid = s["control"]["measures"]["lipid_control"]
    assert lipid["with_reading"] > lipid["denominator"] / 2
    assert 0 < lipid["by_treatment"]["TX_0003"]["numerator"] < lipid["by_treatment"]["TX_0003"]["units"]
