"""The new-user washout of the change design (mapping v2): prior requests, recorded history, and
mapping v1 (no washout) unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events

V1, V2 = (load_mapping(MAPPINGS_ROOT / v) for v in ("v1", "v2"))


def short_gap(mapping, gap=30):
    """v2 with a 30-day episode gap, so a request months before the start is another episode and only
    the washout (365 days in v2) can refuse the later start."""
    measures = {k: dataclasses.replace(m, episode_gap_days=gap) for k, m in mapping.measures.items()}
    return dataclasses.replace(mapping, measures=measures)


def episode(tb, prior=None, history=-1000):
    """One hypertension + HCTZ start on day 0 with a baseline and a follow-up reading; the patient's
    earliest record is the condition's onset on day ``history``; optionally an earlier HCTZ request."""
    tb.patient()
    c = tb.condition(onset=history)
    if prior is not None:
        tb.request(when=-prior, reasons=[c])
    tb.request(when=0, reasons=[c])
    tb.obs(when=-1, value=160.0)
    tb.obs(when=60, value=145.0)


def start_day_fates(result):
    s = result.summary["by_measure"]["systolic_bp"]
    return {k: v for k, v in s["excluded"].items() if v}, s["events"]


@pytest.mark.parametrize(("prior", "excluded", "events"), [
    (364, {"not_new_user": 1}, 0),
    (365, {"not_new_user": 1}, 0),  # the look-back's far end is inside it
    (366, {}, 1),
])
def test_a_request_of_the_same_treatment_in_the_washout_refuses_the_start(tb, prior, excluded, events):
    episode(tb, prior=prior)
    result = derive_outcome_events(tb.tables(), short_gap(V2))
    got_excluded, got_events = start_day_fates(result)
    # the earlier request is an episode of its own (no baseline before it): only day 0 can be an event
    assert result.summary["by_measure"]["systolic_bp"]["episodes"] == 2
    assert got_events == events
    assert got_excluded.get("not_new_user", 0) == excluded.get("not_new_user", 0)
    s = result.summary
    assert s["totals"]["events"] + s["totals"]["excluded"] == s["totals"]["episodes"]


@pytest.mark.parametrize(("history", "reason"), [(-364, "short_history"), (-365, None)])
def test_history_shorter_than_the_washout_is_not_a_new_user(tb, history, reason):
    episode(tb, history=history)
    result = derive_outcome_events(tb.tables(), V2)
    excluded, events = start_day_fates(result)
    assert (excluded, events) == (({reason: 1}, 0) if reason else ({}, 1))


def test_an_early_reading_counts_as_history(tb):
    episode(tb, history=-30)  # diagnosed last month ...
    tb.obs(when=-400, value=150.0)  # ... but seen a year before: the extract knows the patient
    result = derive_outcome_events(tb.tables(), V2)
    assert start_day_fates(result) == ({}, 1)


def test_an_unlinked_request_in_the_washout_refuses_the_start(tb):
    """v2 as shipped: a request of the treatment before the condition was recorded (so linked to no
    bucket and in no episode) still shows the patient is not a new user."""
    tb.patient()
    tb.obs(when=-800, value=150.0)
    tb.request(when=-200)  # no reason, no condition active yet: not linked
    c = tb.condition(onset=-10)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-1, value=160.0)
    tb.obs(when=60, value=145.0)
    result = derive_outcome_events(tb.tables(), V2)
    assert result.summary["totals"]["episodes"] == 1
    assert start_day_fates(result) == ({"not_new_user": 1}, 0)


def test_mapping_v1_has_no_washout(tb):
    episode(tb, history=-30)
    result = derive_outcome_events(tb.tables(), V1)
    assert start_day_fates(result) == ({}, 1)


def test_a_request_of_another_treatment_does_not_refuse_the_start(tb):
    tb.patient()
    c = tb.condition(onset=-1000)
    tb.request(code="314076", when=-100, reasons=[c])  # lisinopril before HCTZ: HCTZ is still new
    tb.request(when=0, reasons=[c])
    tb.obs(when=-1, value=160.0)
    tb.obs(when=60, value=145.0)
    result = derive_outcome_events(tb.tables(), short_gap(V2))
    by_tx = result.summary["by_treatment"]
    assert by_tx["TX_0001"]["events"] == 1 and by_tx["TX_0001"]["excluded"]["not_new_user"] == 0


def test_unmapped_codes_of_a_treatment_class_are_counted_by_code(tb):
    # v2 maps every code of its classes that the fixtures hold: a site's own class list may name more
    amlodipine_2_5, nifedipine = "308136", "198032"
    classes = {**V2.treatment_classes,
               "antihypertensive": (*V2.treatment_classes["antihypertensive"], amlodipine_2_5, nifedipine)}
    mapping = dataclasses.replace(V2, treatment_classes=classes)
    tb.patient()
    c = tb.condition(onset=-1000)
    tb.request(code=amlodipine_2_5, when=-50)
    tb.request(code=amlodipine_2_5, when=-20, status="stopped")  # every status counts
    tb.request(code=nifedipine, when=-10)
    tb.request(code="316052", when=-5)  # HCTZ 6.25 MG: mapped in v2 (TX_0001, beside 25 MG)
    tb.request(code="316049", when=0, reasons=[c])  # HCTZ 25 MG: mapped (TX_0001)
    tb.request(code="313782", when=0)  # acetaminophen: in no class
    s = derive_outcome_events(tb.tables(), mapping).summary
    assert s["treatment_classes"] == {
        "antihypertensive": {"requests": 5, "unmapped": 3, "unmapped_codes": {amlodipine_2_5: 2, nifedipine: 1}},
        "statin": {"requests": 0, "unmapped": 0, "unmapped_codes": {}},
        "glucose_lowering": {"requests": 0, "unmapped": 0, "unmapped_codes": {}},
    }


def test_mapping_v1_summary_has_no_treatment_classes(tb):
    episode(tb)
    assert "treatment_classes" not in derive_outcome_events(tb.tables(), V1).summary
