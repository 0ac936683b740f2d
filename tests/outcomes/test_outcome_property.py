"""The vectorised derivation agrees with a plain per-episode reference on random small histories."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events

MAPPING = load_mapping(MAPPINGS_ROOT / "v1")  # the reference below has no washout
SBP = MAPPING.measures["systolic_bp"]

# days cluster on window edges and collide often, so boundaries and same-day ties get exercised
REQUEST_DAYS = [0, 1, 100, 399, 400, 799, 800]
OFFSETS = [-181, -180, -179, -1, 0, 1, 27, 28, 29, 100, 399, 400, 401]
obs_st = st.tuples(
    st.builds(lambda a, b: a + b, st.sampled_from(REQUEST_DAYS), st.sampled_from(OFFSETS)),  # day
    st.integers(0, 23),  # hour
    st.sampled_from([120.0, 135.0, 150.0, 165.0, 180.0, 20.0, 900.0]),  # the last two: outside [40, 300]
    st.sampled_from(["mm[Hg]", "mm[Hg]", "mm[Hg]", "kPa"]),
)
patient_st = st.tuples(
    st.lists(st.sampled_from(REQUEST_DAYS), min_size=1, max_size=4),  # request days
    st.lists(obs_st, max_size=8),
)


def reference(request_days, observations):
    """Per-episode loop straight from docs/outcomes.md."""
    days = sorted(request_days)
    starts = [d for i, d in enumerate(days) if i == 0 or d - days[i - 1] >= SBP.episode_gap_days]
    plausible = [SBP.plausible_min <= v <= SBP.plausible_max for _, _, v, _ in observations]
    ok = [(d, h, v) for (d, h, v, u), p in zip(observations, plausible) if u == SBP.unit and p]
    bad = [(d, h, v) for d, h, v, u in observations if u != SBP.unit]
    wild = [(d, h, v) for (d, h, v, u), p in zip(observations, plausible) if u == SBP.unit and not p]
    events, reasons = [], []
    for s in starts:
        def base(rows):
            inside = [r for r in rows if s - SBP.baseline_days <= r[0] <= s]
            return max(inside, key=lambda r: (r[0], r[1])) if inside else None

        def follow(rows):
            inside = [r for r in rows if s + SBP.followup_min_days <= r[0] <= s + SBP.followup_max_days]
            return min(inside, key=lambda r: (r[0], r[1])) if inside else None

        b, f = base(ok), follow(ok)
        if b is None:
            reasons.append("baseline_unit_mismatch" if base(bad) else "baseline_implausible" if base(wild) else "no_baseline")
        elif f is None:
            reasons.append("followup_unit_mismatch" if follow(bad) else "followup_implausible" if follow(wild) else "no_followup")
        else:
            events.append((s, b[2], f[2], f[2] - b[2] <= -SBP.threshold))
    return events, reasons


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(patient_st, min_size=1, max_size=4))
def test_matches_reference(tables_cls, day0, patients):
    tb = tables_cls()
    tb.obs(patient="zz-end", when=5000, value=1.0)  # data runs past every window: no "pending"
    want_events, want_reasons = set(), []
    for i, (request_days, observations) in enumerate(patients):
        p = f"p{i}"
        tb.patient(p)
        c = tb.condition(patient=p, onset=-1000)
        for j, d in enumerate(request_days):
            tb.request(patient=p, when=d, reasons=[c] if j % 2 else [])  # mix reference and time linkage
        for d, h, v, u in observations:
            tb.obs(patient=p, when=d, hour=h, value=v + h / 100, unit=u)
        ev, rs = reference(request_days, [(d, h, v + h / 100, u) for d, h, v, u in observations])
        want_events |= {(p, *e) for e in ev}
        want_reasons += rs
    result = derive_outcome_events(tb.tables(), MAPPING)
    start_day = (result.events["start"].dt.normalize() - day0).dt.days
    got = set(zip(result.events["patient_key"], start_day, result.events["baseline_value"],
                  result.events["followup_value"], result.events["responded"]))
    assert got == want_events
    reasons = result.summary["exclusion_reasons"]
    assert {k: v for k, v in reasons.items() if v} == {r: want_reasons.count(r) for r in set(want_reasons)}

