"""Baseline and follow-up windows at their edges, value choice inside a window, response rule."""

from __future__ import annotations

import pandas as pd
import pytest

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events

MAPPING = load_mapping(MAPPINGS_ROOT / "v1")  # v1: systolic_bp baseline 180 d, follow-up [28, 400] d, threshold 10 mm[Hg]
SBP = MAPPING.measures["systolic_bp"]


def one_episode(tb, baseline_at=None, followup_at=None, baseline=160.0, followup=145.0):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    if baseline_at is not None:
        tb.obs(when=baseline_at, value=baseline)
    if followup_at is not None:
        tb.obs(when=followup_at, value=followup)
    return derive_outcome_events(tb.tables(), MAPPING)


def test_v1_windows_are_what_these_tests_assume():
    assert (SBP.baseline_days, SBP.followup_min_days, SBP.followup_max_days, SBP.threshold) == (180, 28, 400, 10.0)


@pytest.mark.parametrize(
    "baseline_at, expected",
    [(0, 0), (-1, 1), (-180, 180), (-181, None)],
    ids=["start-day-is-baseline", "day-before", "window-edge", "one-day-outside"],
)
def test_baseline_window_edges(tb, baseline_at, expected):
    result = one_episode(tb, baseline_at=baseline_at, followup_at=60)
    if expected is None:
        assert result.events.empty
        assert result.summary["exclusion_reasons"]["no_baseline"] == 1
    else:
        assert result.events["baseline_days"].tolist() == [expected]


@pytest.mark.parametrize(
    "followup_at, expected",
    [(27, None), (28, 28), (400, 400), (401, None)],
    ids=["day-before-min", "min-edge", "max-edge", "day-after-max"],
)
def test_followup_window_edges(tb, followup_at, expected):
    tb.obs(when=1000, value=1.0)  # data goes on long after: a missing follow-up is not "pending"
    result = one_episode(tb, baseline_at=-5, followup_at=followup_at)
    if expected is None:
        assert result.events.empty
        assert result.summary["exclusion_reasons"]["no_followup"] == 1
    else:
        assert result.events["followup_days"].tolist() == [expected]


def test_a_value_on_day_1_to_27_is_neither_baseline_nor_followup(tb):
    tb.obs(when=1000, value=1.0)
    result = one_episode(tb, baseline_at=1, followup_at=27)
    assert result.events.empty
    assert result.summary["exclusion_reasons"]["no_baseline"] == 1


def test_baseline_is_latest_and_followup_is_first_in_window(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    for when, value in [(-150, 170.0), (-10, 160.0), (30, 150.0), (200, 120.0)]:
        tb.obs(when=when, value=value)
    ev = derive_outcome_events(tb.tables(), MAPPING).events.iloc[0]
    assert (ev.baseline_value, ev.baseline_days, ev.followup_value, ev.followup_days) == (160.0, 10, 150.0, 30)
    assert ev.change == -10.0


def test_same_day_values_resolve_by_time_not_input_order(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-3, value=171.0, hour=15)  # later that day: the baseline
    tb.obs(when=-3, value=199.0, hour=8)  # plausible: it loses on time alone
    tb.obs(when=40, value=150.0, hour=8)  # earlier that day: the follow-up
    tb.obs(when=40, value=199.0, hour=17)
    ev = derive_outcome_events(tb.tables(), MAPPING).events.iloc[0]
    assert (ev.baseline_value, ev.followup_value) == (171.0, 150.0)


def test_windows_use_utc_calendar_days_not_24h_spans(tb):
    # request late in the day, baseline early 180 days before: 180 calendar days, more than 180*24 h
    tb.patient()
    c = tb.condition(onset=-400)
    start = pd.Timestamp("2020-03-01T23:30:00Z")
    tb.request(when=start, reasons=[c])
    tb.obs(when=pd.Timestamp("2019-09-03T00:10:00Z"), value=160.0)  # 2020-03-01 minus 180 days
    tb.obs(when=pd.Timestamp("2020-03-29T00:05:00Z"), value=140.0)  # day 28
    ev = derive_outcome_events(tb.tables(), MAPPING).events.iloc[0]
    assert (ev.baseline_days, ev.followup_days) == (180, 28)


@pytest.mark.parametrize(
    "baseline, followup, responded",
    [(160.0, 150.0, True), (160.0, 150.5, False), (160.0, 130.0, True), (160.0, 170.0, False), (160.0, 160.0, False)],
)
def test_response_lower_is_better_with_threshold(tb, baseline, followup, responded):
    result = one_episode(tb, baseline_at=-1, followup_at=60, baseline=baseline, followup=followup)
    ev = result.events.iloc[0]
    assert ev.change == pytest.approx(followup - baseline)
    assert bool(ev.responded) is responded
    assert result.summary["totals"]["responded"] == int(responded)


def test_unit_mismatch_is_its_own_exclusion_and_counted(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-2, value=21.3, unit="kPa")
    tb.obs(when=-3, value=150.0, unit=None)  # Synthea writes some BP components without a unit
    tb.obs(when=60, value=140.0)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events.empty
    assert result.summary["exclusion_reasons"]["baseline_unit_mismatch"] == 1
    assert result.summary["observations"]["unit_mismatch"] == 2


def test_wrong_unit_value_never_replaces_a_right_unit_value(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-20, value=155.0)
    tb.obs(when=-2, value=21.3, unit="kPa")  # later, but in the wrong unit
    tb.obs(when=60, value=140.0)
    ev = derive_outcome_events(tb.tables(), MAPPING).events.iloc[0]
    assert (ev.baseline_value, ev.baseline_days) == (155.0, 20)


def test_panel_membership(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-2, value=150.0, panel="85354-9")  # listed panel
    tb.obs(when=50, value=100.0, panel="99999-9")  # unlisted panel: not this measure
    tb.obs(when=60, value=140.0, panel=None)  # standalone value
    result = derive_outcome_events(tb.tables(), MAPPING)
    ev = result.events.iloc[0]
    assert (ev.baseline_value, ev.followup_value, ev.followup_days) == (150.0, 140.0, 60)
    assert result.summary["observations"]["other_panel"] == 1


def test_entered_in_error_values_are_not_used(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-2, value=150.0, status="entered-in-error")
    tb.obs(when=60, value=140.0)
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events.empty
    assert result.summary["observations"]["ignored_status"] == 1


def test_followup_pending_when_data_ends_inside_the_window(tb):
    result = one_episode(tb, baseline_at=-2, followup_at=None)  # newest value in the data: day -2
    assert result.summary["exclusion_reasons"]["followup_pending"] == 1
    assert result.summary["exclusion_reasons"]["no_followup"] == 0


def test_followup_only_in_another_unit(tb):
    tb.obs(when=1000, value=1.0)
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-1, value=160.0)
    tb.obs(when=60, value=19.0, unit="kPa")
    result = derive_outcome_events(tb.tables(), MAPPING)
    assert result.events.empty
    assert result.summary["exclusion_reasons"]["followup_unit_mismatch"] == 1
