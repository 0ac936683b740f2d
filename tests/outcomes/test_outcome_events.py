"""Linkage, episodes, cohort columns, exclusion accounting and the event table's contract."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from qis_fhir.mapping import ICD10CM, MAPPINGS_ROOT, SNOMED, load_mapping
from qis_fhir.outcomes import EVENT_COLUMNS, EXCLUSION_REASONS, derive_outcome_events

MAPPING = load_mapping(MAPPINGS_ROOT / "v1")  # the change design without a washout, as v1 pins it


def with_bp(tb, patient="p1", start=0):
    tb.obs(patient=patient, when=start - 1, value=160.0)
    tb.obs(patient=patient, when=start + 60, value=145.0)


# --- linkage -------------------------------------------------------------------------------------

def test_reason_reference_links_even_when_onset_is_later(tb):
    tb.patient()
    c = tb.condition(onset=+30)  # recorded after the request: time linkage would refuse it
    tb.request(when=0, reasons=[c])
    with_bp(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events["bucket"].tolist() == ["hypertension"]
    assert result.summary["episodes_by_link"] == {"reference": 1, "time": 0}


def test_reason_reference_to_an_untreated_bucket_does_not_fall_back_to_time(tb):
    tb.patient()
    tb.condition(onset=-100)  # hypertension, active: time linkage would accept it
    lipids = tb.condition(code="55822004", onset=-100)
    tb.request(code="316049", when=0, reasons=[lipids])  # HCTZ "for" hyperlipidemia
    with_bp(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events.empty
    assert result.summary["totals"]["unlinked_reason_not_treated"] == 1
    assert result.summary["totals"]["episodes"] == 0


def test_reference_to_a_condition_missing_from_the_extract_falls_back_to_time(tb):
    tb.patient()
    tb.condition(onset=-100)
    tb.request(when=0, reasons=["c-not-extracted"])
    with_bp(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert len(result.events) == 1
    assert result.summary["episodes_by_link"] == {"reference": 0, "time": 1}


def test_reason_code_links_like_a_reference(tb):
    tb.patient()
    tb.request(when=0, reason_codes=[f"{ICD10CM}|I10"])  # no Condition resource at all
    with_bp(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events["bucket"].tolist() == ["hypertension"]


@pytest.mark.parametrize(
    "onset, abatement, linked",
    [(-100, None, True), (0, None, True), (1, None, True), (2, None, False), (-100, -1, False), (-100, 0, True)],
    ids=["active", "same-day", "one-day-tolerance", "onset-after", "abated-before", "abated-that-day"],
)
def test_time_linkage(tb, onset, abatement, linked):
    tb.patient()
    tb.condition(onset=onset, abatement=abatement)
    tb.request(when=0)
    with_bp(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert len(result.events) == int(linked)
    assert result.summary["totals"]["unlinked_no_condition"] == int(not linked)


def test_time_linkage_needs_the_same_patient_and_a_treated_bucket(tb):
    tb.patient("p1")
    tb.patient("p2")
    tb.condition(patient="p2", onset=-100)  # someone else's hypertension
    tb.condition(patient="p1", code="55822004", onset=-100)  # p1's lipids: HCTZ does not treat it
    tb.request(patient="p1", when=0)
    with_bp(tb, "p1")
    assert derive_outcome_events(tb.tables(), MAPPING).events.empty


def test_icd10_coded_condition_maps_like_snomed(tb):
    tb.patient()
    c = tb.condition(code="I10", system=ICD10CM, onset=-10)
    tb.request(when=0, reasons=[c])
    with_bp(tb)
    assert len(derive_outcome_events(tb.tables(), MAPPING).events) == 1


@pytest.mark.parametrize("written", ["I10", "i10", "I10."])
def test_icd10_codes_written_without_the_dot_or_in_lower_case_still_link(tb, written):
    tb.patient("p1")
    c = tb.condition(patient="p1", code="E785" if written == "I10" else "e78.5", system=ICD10CM, onset=-10)
    tb.request(patient="p1", code="316672", when=0, reasons=[c])  # simvastatin for hyperlipidemia, by reference
    tb.obs(patient="p1", when=-1, value=240.0, code="2093-3", unit="mg/dL", panel=None)
    tb.obs(patient="p1", when=90, value=190.0, code="2093-3", unit="mg/dL", panel=None)
    tb.patient("p2")
    tb.request(patient="p2", when=0, reason_codes=[f"{ICD10CM}|{written}"])  # HCTZ for hypertension, by code
    with_bp(tb, patient="p2")
    events = derive_outcome_events(tb.tables(), MAPPING).events
    assert sorted(events["bucket"]) == ["hyperlipidemia", "hypertension"]


def test_unmapped_and_cancelled_requests_make_no_episode(tb):
    tb.patient()
    c = tb.condition(onset=-10)
    tb.request(code="313782", when=0, reasons=[c])  # acetaminophen: not in the mapping
    tb.request(when=0, reasons=[c], status="entered-in-error")
    with_bp(tb)
    s = derive_outcome_events(tb.tables(), MAPPING).summary
    assert (s["totals"]["requests"], s["totals"]["requests_mapped"], s["totals"]["episodes"]) == (2, 0, 0)
    assert s["totals"]["requests_ignored_status"] == 1


# --- episodes ------------------------------------------------------------------------------------

def test_episode_gap_edges(tb):
    gap = MAPPING.measures["systolic_bp"].episode_gap_days  # 400
    tb.patient()
    c = tb.condition(onset=-1000)
    for when in [0, gap - 1, 2 * gap - 1, 3 * gap - 1 + gap]:  # 0 -> 399 continue; +400 new; +800 new
        tb.request(when=when, reasons=[c])
    tb.obs(when=5000, value=1.0)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.summary["totals"]["episodes"] == 3
    assert result.summary["totals"]["requests_linked"] == 4


def test_event_start_is_the_first_request_of_the_episode(tb):
    tb.patient()
    c = tb.condition(onset=-1000)
    for when in [0, 365, 730]:  # yearly renewals: one episode
        tb.request(when=when, reasons=[c])
    with_bp(tb)
    tb.obs(when=370, value=150.0)  # baseline of a renewal would be this one; must not be used
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert len(result.events) == 1
    ev = result.events.iloc[0]
    assert (ev.baseline_days, ev.followup_days, ev.start_period) == (1, 60, "2020-03")


def test_one_request_for_two_buckets_gives_an_event_per_bucket(tb):
    tb.patient()
    t2 = tb.condition(code="44054006", onset=-100)
    pre = tb.condition(code="15777000", onset=-100)
    tb.request(code="860975", when=0, reasons=[t2, pre])
    tb.obs(when=-5, value=7.5, code="4548-4", unit="%", panel=None)
    tb.obs(when=100, value=6.8, code="4548-4", unit="%", panel=None)
    ev = derive_outcome_events(tb.tables(), MAPPING).events
    assert sorted(ev["bucket"]) == ["prediabetes", "type2_diabetes"]
    assert ev["event_id"].is_unique
    assert ev["responded"].all()  # -0.7 %, threshold 0.5 %


# --- cohort columns ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "birth, band",
    [("1955-03-01", "65+"), ("1955-03-02", "40-64"), ("2002-03-01", "18-39"), ("2002-03-02", "0-17"), (None, "unknown")],
    ids=["65th-birthday-at-start", "day-before-65", "18th-birthday", "still-17", "no-birth-date"],
)
def test_age_band_at_start(tb, birth, band):
    tb.patient(birth=birth)  # start day is 2020-03-01
    c = tb.condition(onset=-10)
    tb.request(when=0, reasons=[c])
    with_bp(tb)
    assert derive_outcome_events(tb.tables(), MAPPING).events["age_band"].tolist() == [band]


def test_sex_outside_the_cohort_list_becomes_unknown(tb):
    tb.patient("p1", sex="male")
    tb.patient("p2", sex=None)
    for p in ("p1", "p2"):
        c = tb.condition(patient=p, onset=-10)
        tb.request(patient=p, when=0, reasons=[c])
        with_bp(tb, p)
    ev = derive_outcome_events(tb.tables(), MAPPING).events.sort_values("patient_key")
    assert ev["sex"].tolist() == ["male", "unknown"]


# --- accounting and contract ---------------------------------------------------------------------

def mixed(tb):
    """Eight episodes, each with a different fate."""
    tb.obs(patient="x", when=3000, value=1.0)  # data runs long past every window
    fates = {
        "ok": lambda p: with_bp(tb, p),
        "nobase": lambda p: tb.obs(patient=p, when=60, value=140.0),
        "nofu": lambda p: tb.obs(patient=p, when=-1, value=140.0),
        "unit": lambda p: (tb.obs(patient=p, when=-1, value=20.0, unit="kPa"), tb.obs(patient=p, when=60, value=1.0)),
        "typo-base": lambda p: (tb.obs(patient=p, when=-1, value=900.0), tb.obs(patient=p, when=60, value=140.0)),
        "typo-fu": lambda p: (tb.obs(patient=p, when=-1, value=160.0), tb.obs(patient=p, when=60, value=14.0)),
        "ghost": lambda p: with_bp(tb, p),
    }
    for name, fate in fates.items():
        p = f"pt-{name}-4f2a"  # key-like, so "no key in the summary" cannot pass by accident
        if name != "ghost":
            tb.patient(p)
        c = tb.condition(patient=p, onset=-10)
        tb.request(patient=p, when=0, reasons=[c])
        fate(p)
    p = "pt-lipids-4f2a"
    tb.patient(p)
    c = tb.condition(patient=p, code="55822004", onset=-10)
    tb.request(patient=p, code="316672", when=0, reasons=[c])
    tb.obs(patient=p, when=-3, value=240.0, code="2093-3", unit="mg/dL", panel=None)
    tb.obs(patient=p, when=90, value=190.0, code="2093-3", unit="mg/dL", panel=None)


def test_every_episode_is_an_event_or_has_one_reason(tb):
    mixed(tb)
    s = derive_outcome_events(tb.tables(), MAPPING).summary
    assert s["totals"]["episodes"] == 8 and s["totals"]["events"] == 2
    assert s["totals"]["events"] + s["totals"]["excluded"] == s["totals"]["episodes"]
    assert s["exclusion_reasons"] == {
        "patient_unknown": 1,
        "not_new_user": 0,  # mapping v1 declares no washout
        "short_history": 0,
        "baseline_unit_mismatch": 1,
        "baseline_implausible": 1,
        "no_baseline": 1,
        "followup_unit_mismatch": 0,
        "followup_implausible": 1,
        "followup_pending": 0,
        "no_followup": 1,
    }
    for part in ("by_bucket", "by_treatment", "by_measure"):
        for name, c in s[part].items():
            assert c["events"] + sum(c["excluded"].values()) == c["episodes"], (part, name)
        assert sum(c["episodes"] for c in s[part].values()) == s["totals"]["episodes"]
    assert s["by_bucket"]["hypertension"]["events"] == 1 and s["by_bucket"]["hyperlipidemia"]["responded"] == 1
    assert set(s["by_treatment"]) == set(MAPPING.treatments)  # zeros included: stable shape
    assert list(s["exclusion_reasons"]) == EXCLUSION_REASONS


def test_summary_holds_no_patient_key_or_date(tb):
    mixed(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    blob = json.dumps(result.summary)
    assert len(result.events) == 2
    assert "pt-" not in blob
    assert "2020-" not in blob and "2019-" not in blob


def test_event_table_contract(tb):
    mixed(tb)
    result = derive_outcome_events(tb.tables(), MAPPING)
    ev = result.events
    assert list(ev.columns) == EVENT_COLUMNS
    assert str(ev["start"].dtype) == "datetime64[us, UTC]"
    assert {c: str(ev[c].dtype) for c in ["baseline_days", "followup_days", "change", "responded"]} == {
        "baseline_days": "int64", "followup_days": "int64", "change": "float64", "responded": "bool"}
    assert set(ev["mapping_version"]) == {"v1"} and set(ev["mapping_hash"]) == {MAPPING.content_hash}
    assert ev["event_id"].str.fullmatch("[0-9a-f]{32}").all() and ev["event_id"].is_unique
    assert set(ev["treatment_code"]) <= set(MAPPING.treatments)


def test_event_ids_are_stable_across_runs_and_input_order(tb):
    mixed(tb)
    tables = tb.tables()
    first = derive_outcome_events(tables, MAPPING).events
    shuffled = {k: v.sample(frac=1.0, random_state=7).reset_index(drop=True) for k, v in tables.items()}
    second = derive_outcome_events(shuffled, MAPPING).events
    pd.testing.assert_frame_equal(first, second)


def test_empty_tables_give_an_empty_typed_table(tb):
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events.empty and list(result.events.columns) == EVENT_COLUMNS
    assert result.summary["totals"]["episodes"] == 0


def test_naive_timestamps_are_read_as_utc(tb):
    tb.patient()
    c = tb.condition(onset=-10)
    tb.request(when=0, reasons=[c])
    with_bp(tb)
    tables = tb.tables()
    naive = {k: v.copy() for k, v in tables.items()}
    for name, cols in {"observations": ["effective"], "medication_requests": ["authored_on"]}.items():
        for col in cols:
            naive[name][col] = naive[name][col].dt.tz_localize(None)
    pd.testing.assert_frame_equal(derive_outcome_events(naive, MAPPING).events, derive_outcome_events(tables, MAPPING).events)


def test_snomed_constant_matches_the_extract_contract():
    assert SNOMED == "http://snomed.info/sct"
