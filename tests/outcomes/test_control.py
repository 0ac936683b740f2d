"""Control measures (mapping v2): denominators, index readings, treatments and exclusions at every edge.

Synthea's blood pressures are almost never under 140/90, so these hand-built patients include
controlled ones: a numerator that is always 0 would pass every test on Synthea alone.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events
from qis_fhir.outcomes.control import check_control_summary

HCTZ, LISINOPRIL, AMLODIPINE, SIMVASTATIN = "316049", "314076", "197361", "316672"


@pytest.fixture(scope="module")
def v2():
    return load_mapping(MAPPINGS_ROOT / "v2")


def T(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def patient(tb, key, birth="1960-06-15", onset="2015-01-01", visits=("2022-05-10",), sex="female",
            code="38341003"):
    """A patient with hypertension (by default) since ``onset`` and visits in the measurement year."""
    tb.patient(key, sex=sex, birth=birth)
    tb.condition(patient=key, code=code, onset=T(onset))
    for v in visits:
        tb.visit(key, T(v))


def bp(tb, key, when, systolic, diastolic, panel="55284-4"):
    tb.obs(key, when=T(when), value=float(systolic), code="8480-6", panel=panel)
    tb.obs(key, when=T(when), value=float(diastolic), code="8462-4", panel=panel)


def run(tb, mapping, measure="bp_control"):
    tb.visit("zz-data-end", T("2023-02-01"))  # the data reach into 2023: 2022 is a complete year
    result = derive_outcome_events(tb.tables(), mapping)
    units = result.units
    return units[units["measure"] == measure].reset_index(drop=True), result.summary["control"]["measures"][measure]


def one(units, key):
    rows = units[units["patient_key"] == key]
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.mark.parametrize(
    "birth, eligible, band",
    [
        ("2004-12-31", True, "18-39"),  # 18 on the year's last day: in, though 17 for all but one day
        ("2005-01-01", False, None),  # 17 on the year's last day
        ("1937-12-31", True, "65+"),  # 85 on the year's last day
        ("1936-12-31", False, None),  # 86 on the year's last day: out, though 85 until that day
        ("1982-12-31", True, "40-64"),  # the band is the age at the year's end (40), not at the visit (39)
    ],
)
def test_age_on_the_last_day_of_the_year_at_both_ends(tb, v2, birth, eligible, band):
    patient(tb, "p1", birth=birth)
    units, s = run(tb, v2)
    assert s["candidates"] == 1
    assert s["eligible"] == int(eligible)
    assert s["not_eligible"]["outside_age_range"] == int(not eligible)
    if eligible:
        assert one(units, "p1")["age_band"] == band
    else:
        assert units.empty


@pytest.mark.parametrize(
    "onset, candidate",
    [
        ("2022-06-30T23:59:00Z", True),  # the last minute of the sixth month
        ("2022-07-01T00:00:00Z", False),  # the first of the seventh
        ("2010-03-01", True),  # long before the year: prevalent, counted
    ],
)
def test_onset_in_the_sixth_month_counts_and_in_the_seventh_does_not(tb, v2, onset, candidate):
    patient(tb, "p1", onset=onset, visits=("2022-10-10",))
    units, s = run(tb, v2)
    assert s["candidates"] == int(candidate) == len(units)


def test_a_condition_abated_before_the_year_or_no_visit_in_it_gives_no_unit(tb, v2):
    tb.patient("abated")
    tb.condition(patient="abated", onset=T("2015-01-01"), abatement=T("2021-12-31"))
    tb.visit("abated", T("2022-03-03"))
    patient(tb, "no-visit", visits=("2021-05-05", "2023-01-10"))  # visits, but none in 2022 (2023 incomplete)
    patient(tb, "cancelled", visits=())
    tb.visit("cancelled", T("2022-04-04"), status="cancelled")
    units, s = run(tb, v2)
    assert s["candidates"] == 1 and s["by_year"] == {"2021": {"denominator": 1, "numerator": 0}}
    assert list(units["patient_key"]) == ["no-visit"] and list(units["period"]) == ["2021"]


@pytest.mark.parametrize(
    "systolic, diastolic, controlled",
    [
        (139, 89, True),
        (140, 80, False),  # exactly at the systolic threshold: not under it
        (130, 90, False),  # exactly at the diastolic threshold
        (139.9, 89.9, True),
    ],
)
def test_last_reading_exactly_at_the_threshold_is_not_controlled(tb, v2, systolic, diastolic, controlled):
    patient(tb, "p1")
    bp(tb, "p1", "2022-05-10T10:00Z", systolic, diastolic)
    units, s = run(tb, v2)
    u = one(units, "p1")
    assert bool(u["numerator"]) is controlled
    assert u["index_value"] == systolic and list(u["values"]) == [systolic, diastolic]
    assert s["numerator"] == int(controlled) and s["with_reading"] == 1


def test_two_readings_on_the_last_day_take_the_lowest_systolic_and_the_lowest_diastolic(tb, v2):
    patient(tb, "p1", visits=("2022-03-01", "2022-11-20"))
    bp(tb, "p1", "2022-03-01T10:00Z", 120, 70)  # controlled, but not the last reading day
    bp(tb, "p1", "2022-11-20T09:00Z", 150, 85)
    bp(tb, "p1", "2022-11-20T16:00Z", 135, 95)  # neither reading is under 140/90; the day's lowest are
    units, _ = run(tb, v2)
    u = one(units, "p1")
    assert list(u["values"]) == [135.0, 85.0] and bool(u["numerator"])
    assert u["index_day"] == T("2022-11-20")


def test_the_last_reading_day_decides_even_when_an_earlier_one_was_controlled(tb, v2):
    patient(tb, "p1")
    bp(tb, "p1", "2022-02-01T10:00Z", 120, 70)
    bp(tb, "p1", "2022-12-31T23:00Z", 150, 95)  # the year's last hour, in UTC
    bp(tb, "p1", "2023-01-01T01:00Z", 110, 60)  # the next year: not this year's reading
    units, _ = run(tb, v2)
    u = one(units, "p1")
    assert list(u["values"]) == [150.0, 95.0] and not u["numerator"]


def test_a_day_with_only_a_systolic_value_is_no_reading_day(tb, v2):
    patient(tb, "p1")
    bp(tb, "p1", "2022-04-01T10:00Z", 130, 80)
    tb.obs("p1", when=T("2022-09-01T10:00Z"), value=170.0, code="8480-6")  # diastolic missing that day
    units, _ = run(tb, v2)
    assert list(one(units, "p1")["values"]) == [130.0, 80.0]


def test_no_reading_counts_in_the_denominator_as_not_controlled(tb, v2):
    patient(tb, "p1")
    bp(tb, "p1", "2021-12-01T10:00Z", 120, 70)  # last year's reading does not carry over
    units, s = run(tb, v2)
    u = one(units, "p1")
    assert not u["numerator"] and math.isnan(u["index_value"]) and pd.isna(u["index_day"])
    assert list(u["values"]) == []
    assert (s["denominator"], s["numerator"], s["with_reading"], s["no_reading"]) == (1, 0, 0, 1)


def test_excluded_patients_are_counted_by_reason_and_give_no_unit(tb, v2):
    patient(tb, "pregnant")
    tb.condition(patient="pregnant", code="72892002", onset=T("2022-09-01"), abatement=T("2023-04-01"))
    patient(tb, "esrd")
    tb.condition(patient="esrd", code="N18.6", system="http://hl7.org/fhir/sid/icd-10-cm", onset=T("2020-01-01"))
    patient(tb, "both")  # pregnancy is listed first: one reason per patient-year, the first that applies
    tb.condition(patient="both", code="77386006", onset=T("2022-01-10"))
    tb.condition(patient="both", code="Z992", system="http://hl7.org/fhir/sid/icd-10-cm", onset=T("2022-01-10"))
    patient(tb, "past-pregnancy")  # over before the year began: not excluded
    tb.condition(patient="past-pregnancy", code="72892002", onset=T("2020-01-01"), abatement=T("2020-10-01"))
    units, s = run(tb, v2)
    assert s["excluded"] == {"pregnancy": 2, "esrd_dialysis": 1, "hospice": 0}
    assert s["eligible"] == 4 and s["denominator"] == 1
    assert list(units["patient_key"]) == ["past-pregnancy"]


def test_two_treatments_at_once_count_in_each_cell_and_once_in_the_denominator(tb, v2):
    patient(tb, "p1")
    bp(tb, "p1", "2022-05-10T10:00Z", 128, 78)
    tb.request("p1", code=HCTZ, when=T("2022-01-15"), status="stopped")
    tb.request("p1", code=LISINOPRIL, when=T("2021-08-01"), status="stopped")
    units, s = run(tb, v2)
    assert sorted(units["treatment_code"]) == ["TX_0001", "TX_0002"]
    assert units["numerator"].all() and units["index_value"].eq(128.0).all()
    assert s["denominator"] == 1 and s["units"] == 2 and s["on_several_treatments"] == 1
    assert s["by_treatment"]["TX_0001"] == s["by_treatment"]["TX_0002"] == {"units": 1, "numerator": 1, "with_reading": 1}
    assert s["by_treatment"]["TX_NONE"]["units"] == 0


@pytest.mark.parametrize(
    "authored, status, treated",
    [
        ("2021-05-10T08:00Z", "stopped", True),  # 365 days before the index day: inside the look-back
        ("2021-05-09T08:00Z", "stopped", False),  # 366 days: outside, and stopped at some unknown date
        ("2016-01-01", "active", True),  # still active at the export: never stopped before the index
        ("2016-01-01", "completed", False),
        ("2022-05-11T08:00Z", "active", False),  # after the index day
        ("2022-05-10T23:00Z", "stopped", True),  # the index day itself
    ],
)
def test_treatment_lookback_before_the_index_day(tb, v2, authored, status, treated):
    patient(tb, "p1")
    bp(tb, "p1", "2022-05-10T10:00Z", 150, 95)
    tb.request("p1", code=HCTZ, when=T(authored), status=status)
    units, s = run(tb, v2)
    assert one(units, "p1")["treatment_code"] == ("TX_0001" if treated else "TX_NONE")
    assert s["untreated"] == int(not treated)


def test_without_a_reading_the_lookback_ends_on_the_last_day_of_the_year(tb, v2):
    patient(tb, "p1")
    tb.request("p1", code=AMLODIPINE, when=T("2022-12-20"), status="stopped")
    units, _ = run(tb, v2)
    assert one(units, "p1")["treatment_code"] == "TX_0007"


def test_a_treatment_for_another_condition_does_not_count(tb, v2):
    patient(tb, "p1")
    tb.request("p1", code=SIMVASTATIN, when=T("2022-02-02"))
    units, _ = run(tb, v2)
    assert one(units, "p1")["treatment_code"] == "TX_NONE"


def test_hand_computed_patients(tb, v2):
    """Five patients over two complete years; every unit worked out by hand from CMS165's rules."""
    # a: 2021 controlled on lisinopril (renewed yearly, stopped); 2022 no reading, still on it
    patient(tb, "a", birth="1950-03-01", onset="2018-04-01", visits=("2021-04-01", "2022-04-01"), sex="male")
    bp(tb, "a", "2021-04-01T09:00Z", 132, 84)
    tb.request("a", code=LISINOPRIL, when=T("2021-04-01"), status="stopped")
    tb.request("a", code=LISINOPRIL, when=T("2022-04-01"), status="stopped")
    # b: untreated, 2022 only (onset in March), not controlled (diastolic 92)
    patient(tb, "b", birth="1990-07-07", onset="2022-03-15", visits=("2022-08-08",))
    bp(tb, "b", "2022-08-08T09:00Z", 128, 92)
    # c: on amlodipine since 2019 (still active) and HCTZ started 2022; controlled in 2022 only
    patient(tb, "c", birth="1975-01-20", onset="2019-02-02", visits=("2021-06-06", "2022-06-06"))
    bp(tb, "c", "2021-06-06T09:00Z", 145, 88)
    bp(tb, "c", "2022-06-06T09:00Z", 118, 76)
    tb.request("c", code=AMLODIPINE, when=T("2019-02-02"), status="active")
    tb.request("c", code=HCTZ, when=T("2022-01-05"), status="stopped")
    # d: onset in October 2021 -> not in 2021; in 2022 excluded (hospice)
    patient(tb, "d", birth="1940-01-01", onset="2021-10-01", visits=("2021-11-11", "2022-02-02"))
    tb.condition(patient="d", code="170935008", onset=T("2022-09-01"))
    # e: no birth date: a candidate in 2022, never eligible
    patient(tb, "e", birth=None, visits=("2022-01-01",))
    units, s = run(tb, v2)

    got = sorted(
        (u.patient_key, u.period, u.treatment_code, u.age_band, u.sex, None if math.isnan(u.index_value) else u.index_value,
         bool(u.numerator))
        for u in units.itertuples()
    )
    assert got == [
        ("a", "2021", "TX_0002", "65+", "male", 132.0, True),
        ("a", "2022", "TX_0002", "65+", "male", None, False),
        ("b", "2022", "TX_NONE", "18-39", "female", 128.0, False),
        ("c", "2021", "TX_0007", "40-64", "female", 145.0, False),
        ("c", "2022", "TX_0001", "40-64", "female", 118.0, True),
        ("c", "2022", "TX_0007", "40-64", "female", 118.0, True),
    ]
    assert s["candidates"] == 7  # a x2, b, c x2, d (2022), e
    assert s["not_eligible"] == {"patient_unknown": 0, "age_unknown": 1, "outside_age_range": 0}
    assert s["excluded"] == {"pregnancy": 0, "esrd_dialysis": 0, "hospice": 1}
    assert (s["denominator"], s["numerator"], s["units"], s["treated"], s["untreated"]) == (5, 2, 6, 4, 1)
    assert s["by_year"] == {"2021": {"denominator": 2, "numerator": 1}, "2022": {"denominator": 3, "numerator": 1}}
    assert s["by_treatment"]["TX_0007"] == {"units": 2, "numerator": 1, "with_reading": 2}
    assert units["unit_id"].is_unique and units["unit_id"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert set(units["mapping_version"]) == {"v2"}


def test_an_incomplete_year_gives_no_unit(tb, v2):
    patient(tb, "p1", visits=("2023-01-15",))  # 2023 has data until February only
    bp(tb, "p1", "2023-01-15T10:00Z", 120, 70)
    units, s = run(tb, v2)
    assert units.empty and s["candidates"] == 0


def test_lipid_control_needs_ldl_and_total_cholesterol_under_their_thresholds(tb, v2):
    for key, ldl, total in (("under", 99.0, 199.0), ("ldl-at", 100.0, 150.0), ("total-at", 80.0, 200.0)):
        patient(tb, key, code="55822004")
        tb.obs(key, when=T("2022-05-10T10:00Z"), value=ldl, code="18262-6", unit="mg/dL", panel=None)
        tb.obs(key, when=T("2022-05-10T10:00Z"), value=total, code="2093-3", unit="mg/dL", panel=None)
        tb.request(key, code=SIMVASTATIN, when=T("2022-03-01"), status="stopped")
    units, s = run(tb, v2, "lipid_control")
    assert dict(zip(units["patient_key"], units["numerator"])) == {"under": True, "ldl-at": False, "total-at": False}
    assert set(units["treatment_code"]) == {"TX_0003"}
    assert s["direction"] == "higher" and s["source"].startswith("CMS347")


def test_poor_control_counts_a_missing_reading_as_poor(tb, v2):
    for key, value in (("high", 9.1), ("at", 9.0), ("none", None)):
        patient(tb, key, code="44054006")
        if value is not None:
            tb.obs(key, when=T("2022-05-10T10:00Z"), value=value, code="4548-4", unit="%", panel=None)
    units, s = run(tb, v2, "hba1c_poor_control")
    assert dict(zip(units["patient_key"], units["numerator"])) == {"high": True, "at": False, "none": True}
    assert s["direction"] == "lower" and s["numerator"] == 2 and s["no_reading"] == 1


def test_the_summary_check_refuses_counts_that_do_not_add_up(tb, v2):
    patient(tb, "p1")
    _, s = run(tb, v2)
    check_control_summary(s)
    s["excluded"]["pregnancy"] += 1
    with pytest.raises(AssertionError, match="eligible"):
        check_control_summary(s)


def test_v1_has_no_control_measures_and_writes_no_units(tb, tmp_path):
    patient(tb, "p1")
    result = derive_outcome_events(tb.tables(), load_mapping(MAPPINGS_ROOT / "v1"))
    assert result.units is None and "control" not in result.summary
    result.write(tmp_path)
    assert not (tmp_path / "control_units.parquet").exists()


NEW_CONTROL_MEASURE = """
  weight_control:
    kind: control
    source: "a site's own: BMI under 30 at the last weight visit of the year"
    buckets: [hypertension]
    readings:
      - {loinc: "39156-5", unit: "kg/m2", below: 30, plausible_range: [10, 100]}
    age_range: [18, 75]
    onset_by_month: 12
    lookback_days: 180
    untreated_code: TX_NONE
    exclusions:
      pregnancy:
        snomed: ["72892002"]
"""


def test_a_new_control_measure_is_a_yaml_change_only(tb, v2, tmp_path):
    import shutil

    d = shutil.copytree(v2.path, tmp_path / "v2")
    with (d / "outcomes.yaml").open("a") as f:
        f.write(NEW_CONTROL_MEASURE)
    mapping = load_mapping(d)
    patient(tb, "slim", onset="2022-11-01")  # onset by the year's end is enough for this measure
    tb.obs("slim", when=T("2022-05-10T10:00Z"), value=29.9, code="39156-5", unit="kg/m2", panel=None)
    patient(tb, "heavy")
    tb.obs("heavy", when=T("2022-05-10T10:00Z"), value=31.0, code="39156-5", unit="kg/m2", panel=None)
    tb.request("heavy", code=LISINOPRIL, when=T("2021-12-01"), status="stopped")  # 160 days before
    units, s = run(tb, mapping, "weight_control")
    got = {u.patient_key: (u.treatment_code, bool(u.numerator)) for u in units.itertuples()}
    assert got == {"slim": ("TX_NONE", True), "heavy": ("TX_0002", False)}
    assert s["source"].startswith("a site's own") and s["denominator"] == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (("below: 140,", "above: 140,"), "a control reading takes a threshold 'below'"),
        (("buckets: [hypertension]\n    readings", "buckets: [hypertensoin]\n    readings"), "unknown bucket 'hypertensoin'"),
        (("untreated_code: TX_NONE", "untreated_code: TX_0001"), "TX_0001 is a treatment of treatments.yaml"),
        (("age_range: [18, 85]", "age_range: [85, 18]"), "age range [85, 18] is empty"),
        (("onset_by_month: 6", "onset_by_month: 13"), "13 is greater than the maximum of 12"),
        (("    lookback_days: 365\n", ""), "'lookback_days' is a required property"),
    ],
)
def test_control_measure_mistakes_name_file_and_line(v2, tmp_path, change, message):
    import shutil

    from qis_fhir.errors import MappingError

    d = shutil.copytree(v2.path, tmp_path / "v2")
    text = (d / "outcomes.yaml").read_text()
    assert change[0] in text
    (d / "outcomes.yaml").write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(MappingError) as info:
        load_mapping(d)
    assert message in str(info.value) and "outcomes.yaml:" in str(info.value)


def test_synthea_fixture_gives_units_for_all_three_conditions_and_the_summary_adds_up(fixtures_dir, v2, tmp_path):
    import json

    from qis_fhir.fhir import extract_export, load_extract

    extract_export(fixtures_dir / "synthea-r4-105", tmp_path / "x", secret=b"control-fixture-secret-012345678",
                   validate="off")
    result = derive_outcome_events(load_extract(tmp_path / "x"), v2)
    result.write(tmp_path)
    written = json.loads((tmp_path / "outcome_summary.json").read_text())
    units = pd.read_parquet(tmp_path / "control_units.parquet")
    measures = written["control"]["measures"]
    assert set(measures) == {"bp_control", "lipid_control", "hba1c_poor_control"}
    for mid, s in measures.items():
        check_control_summary(s)
        part = units[units["measure"] == mid]
        assert s["denominator"] > 0 and len(part) == s["units"], mid
        assert part.drop_duplicates(["patient_key", "bucket", "period"]).shape[0] == s["denominator"], mid
        assert int(part.drop_duplicates(["patient_key", "bucket", "period"])["numerator"].sum()) == s["numerator"], mid
    assert set(units["bucket"]) == {"hypertension", "hyperlipidemia", "type2_diabetes"}
    # Synthea: pregnancies in women with hypertension are excluded; its statin users are controlled at times
    assert measures["bp_control"]["excluded"]["pregnancy"] > 0
    assert measures["lipid_control"]["by_treatment"]["TX_0003"]["numerator"] > 0
    # the change design's events are unchanged by the control measures beside them
    alone = derive_outcome_events(load_extract(tmp_path / "x"), dataclasses.replace(v2, control_measures={}))
    pd.testing.assert_frame_equal(alone.events, result.events)
    assert alone.summary["totals"] == written["totals"] and alone.units is None


def test_v2_quality_suite_passes_real_units_and_blocks_a_broken_one(tb, v2):
    from qis_fhir.quality import check_tables

    patient(tb, "p1")
    bp(tb, "p1", "2022-05-10T10:00Z", 128, 78)
    tb.request("p1", code=HCTZ, when=T("2022-01-15"))
    units, _ = run(tb, v2)
    key = "0" * 32
    units = units.assign(patient_key=key)
    assert check_tables({"control_units": units}, v2).success
    broken = units.assign(treatment_code="TX_9999")
    report = check_tables({"control_units": broken}, v2)
    assert not report.success
    assert [f.rule.column for f in report.suite("control_units").failures] == ["treatment_code"]


def test_metoprolol_given_for_heart_failure_is_no_hypertension_treatment(tb, v2):
    """Synthea prescribes metoprolol for chronic congestive heart failure with that stated reason: it
    must not make a hypertensive patient 'treated'; one without a stated reason, while hypertension
    is active, does."""
    for key, reasons in (("for-chf", True), ("no-reason", False)):
        patient(tb, key)
        bp(tb, key, "2022-05-10T10:00Z", 128, 78)
        chf = tb.condition(patient=key, code="88805009", onset=T("2020-01-01"))  # chronic congestive heart failure
        tb.request(key, code="866414", when=T("2022-02-01"), status="active", reasons=[chf] if reasons else [])
    units, s = run(tb, v2)
    assert dict(zip(units["patient_key"], units["treatment_code"])) == {"for-chf": "TX_NONE", "no-reason": "TX_0008"}
    assert s["by_treatment"]["TX_0008"] == {"units": 1, "numerator": 1, "with_reading": 1}


def test_two_strengths_of_one_drug_are_one_treatment(tb, v2):
    """HCTZ 25 mg then 6.25 mg: one drug, so one unit under TX_0001 and one change episode."""
    patient(tb, "p1")
    bp(tb, "p1", "2022-05-10T10:00Z", 150, 95)
    tb.request("p1", code=HCTZ, when=T("2021-09-01"), status="stopped")
    tb.request("p1", code="316052", when=T("2022-03-01"), status="active")
    tb.visit("zz-data-end", T("2023-02-01"))
    result = derive_outcome_events(tb.tables(), v2)
    assert list(result.units.loc[result.units["measure"] == "bp_control", "treatment_code"]) == ["TX_0001"]
    assert result.summary["by_treatment"]["TX_0001"]["episodes"] == 1
