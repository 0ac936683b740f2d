"""The planted effects are really in the raw NDJSON, exactly as the answer key states.

``independent_changes`` recomputes every treatment episode's change straight from the export lines
with the v1 rules read from the YAML (latest baseline in [start-180d, start], first follow-up in the
measure's window, age in whole years at the start), sharing no code with the generator.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import orjson
import pytest
from synth_helpers import read_type

from qis_fhir.mapping.yamldoc import read_yaml
from qis_fhir.synth import generate_export

REPO = Path(__file__).resolve().parents[2]
BUCKET_CODES = {"38341003": "hypertension", "59621000": "hypertension", "55822004": "hyperlipidemia",
                "44054006": "type2_diabetes"}
TREATMENTS = {"316049": ("hypertension", "hydrochlorothiazide"), "314076": ("hypertension", "lisinopril"),
              "316672": ("hyperlipidemia", "simvastatin"), "860975": ("type2_diabetes", "metformin"),
              "106892": ("type2_diabetes", "insulin")}
MEASURE_OF = {"hypertension": "systolic_bp", "hyperlipidemia": "total_cholesterol", "type2_diabetes": "hba1c"}


def _v1_measures() -> dict[str, dict]:
    return read_yaml(REPO / "mappings" / "v1" / "outcomes.yaml").data["measures"]


def _band(age: int) -> str:
    return "18-39" if 18 <= age <= 39 else "40-64" if 40 <= age <= 64 else "65+" if age >= 65 else "0-17"


def _age(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def independent_changes(export_dir: Path) -> dict[tuple[str, str, str, str], list[float]]:
    measures = _v1_measures()
    by_loinc = {m["loinc"]: (mid, m) for mid, m in measures.items()}
    patients = {p["id"]: (p["gender"], date.fromisoformat(p["birthDate"])) for p in read_type(export_dir, "Patient")}
    buckets: dict[str, set[str]] = defaultdict(set)
    for c in read_type(export_dir, "Condition"):
        code = c["code"]["coding"][0]["code"]
        if code in BUCKET_CODES:
            buckets[c["subject"]["reference"][8:]].add(BUCKET_CODES[code])
    starts: dict[tuple[str, str], datetime] = {}
    for m in read_type(export_dir, "MedicationRequest"):
        key = (m["subject"]["reference"][8:], m["medicationCodeableConcept"]["coding"][0]["code"])
        t = datetime.fromisoformat(m["authoredOn"])
        if key not in starts or t < starts[key]:
            starts[key] = t
    values: dict[tuple[str, str], list[tuple[datetime, float]]] = defaultdict(list)
    for o in read_type(export_dir, "Observation"):
        pid = o["subject"]["reference"][8:]
        t = datetime.fromisoformat(o["effectiveDateTime"])
        parts = o.get("component", []) if "component" in o else [o]
        panel = o["code"]["coding"][0]["code"] if "component" in o else None
        for part in parts:
            code = part["code"]["coding"][0]["code"]
            q = part.get("valueQuantity", {})
            if code not in by_loinc:
                continue
            mid, m = by_loinc[code]
            if panel is not None and panel not in m["panels"]:
                continue
            if q.get("code") == m["unit"]:
                values[(pid, mid)].append((t, q["value"]))
    out: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for (pid, rx), start in starts.items():
        if rx not in TREATMENTS:
            continue
        bucket, tkey = TREATMENTS[rx]
        if bucket not in buckets[pid]:
            continue
        mid = MEASURE_OF[bucket]
        m = measures[mid]
        series = sorted(values[(pid, mid)])
        day0 = start.date()
        base = [v for t, v in series if 0 <= (day0 - t.date()).days <= m["baseline_days"]]
        fu = [v for t, v in series if m["followup_days"][0] <= (t.date() - day0).days <= m["followup_days"][1]]
        if not base or not fu:
            continue
        sex, birth = patients[pid]
        out[(bucket, tkey, _band(_age(birth, day0)), sex)].append(round(fu[0] - base[-1], 6))
    return out


def test_raw_data_matches_the_answer_key_cohort_by_cohort(medium_export) -> None:
    truth = orjson.loads(medium_export.truth_path.read_bytes())
    found = independent_changes(medium_export.out_dir)
    expected = {
        (c["bucket"], c["treatment"]["key"], c["age_band"]["label"], c["sex"]): c["generated"]
        for c in truth["cohorts"] if c["treatment"] is not None
    }
    assert set(found) <= set(expected), "an episode fell into a cohort the key does not list"
    checked = 0
    for key, gen in expected.items():
        changes = found.get(key, [])
        assert len(changes) == gen["with_baseline_and_followup"], key
        if changes:
            assert statistics.fmean(changes) == pytest.approx(gen["mean_change"], abs=1e-6), key
            checked += 1
    assert checked >= 25


def test_treatments_show_their_planted_effect_and_the_rare_cohort_does_not(medium_export) -> None:
    truth = orjson.loads(medium_export.truth_path.read_bytes())
    found = independent_changes(medium_export.out_dir)
    planted = {(c["bucket"], c["treatment"]["key"], c["age_band"]["label"], c["sex"]): c["planted"]
               for c in truth["cohorts"] if c["treatment"] is not None}
    rare = truth["rare_cohort"]
    rare_key = ("hypertension", "hydrochlorothiazide", rare["age_band"]["label"], rare["sex"])
    by_treatment: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for key, changes in found.items():
        if key == rare_key:
            continue
        for ch in changes:
            by_treatment[key[1]].append((ch, planted[key]["mean_change"], planted[key]["sd_change"]))
    for tkey, rows in by_treatment.items():
        n = len(rows)
        observed = statistics.fmean(r[0] for r in rows)
        expected = statistics.fmean(r[1] for r in rows)
        se = statistics.fmean(r[2] for r in rows) / n ** 0.5
        assert abs(observed - expected) < 4 * se + 0.05, (tkey, n, observed, expected)
    hctz = statistics.fmean(r[0] for r in by_treatment["hydrochlorothiazide"])
    assert hctz < -10.0
    rare_changes = found[rare_key]
    assert len(rare_changes) >= 20
    assert abs(statistics.fmean(rare_changes) - rare["planted"]["mean_change"]) < 4 * 6.0 / len(rare_changes) ** 0.5
    # the usual treatment fails: almost nobody in the rare cohort improves by the 10 mmHg threshold
    assert sum(c <= -10 for c in rare_changes) / len(rare_changes) < 0.2
    # responders in a large ordinary cohort follow the planted fraction
    key = ("hypertension", "lisinopril", "40-64", "male")
    got = sum(c <= -10 for c in found[key]) / len(found[key])
    assert got == pytest.approx(planted[key]["expected_responder_fraction"], abs=0.15)


def test_no_other_hypertensive_is_under_40_at_treatment_start(medium_export) -> None:
    found = independent_changes(medium_export.out_dir)
    young = {k for k in found if k[0] == "hypertension" and k[2] == "18-39"}
    assert young == {("hypertension", "hydrochlorothiazide", "18-39", "female")}


def test_rare_cohort_is_too_small_per_site_but_enough_for_five_pooled(tmp_path: Path) -> None:
    min_cell = 11
    pooled = 0
    profiles = ["default", "urban", "rural", "elderly", "young"]
    for i, profile in enumerate(profiles):
        r = generate_export(tmp_path / f"site{i}", patients=500, seed=100 + i, site_profile=profile)
        truth = orjson.loads(r.truth_path.read_bytes())
        rare = truth["rare_cohort"]
        assert rare["generated"]["patients"] == rare["expected_patients"] == round(rare["rate_per_patient"] * 500) > 0
        key = ("hypertension", "hydrochlorothiazide", "18-39", "female")
        n_site = len(independent_changes(r.out_dir).get(key, []))
        assert n_site == rare["generated"]["with_baseline_and_followup"]
        assert n_site < min_cell, "one site alone must not be able to publish the rare cohort"
        hypertensive = sum(c["generated"]["patients"] for c in truth["cohorts"] if c["bucket"] == "hypertension")
        assert 0.015 <= rare["generated"]["patients"] / hypertensive <= 0.10  # "a few percent"
        pooled += n_site
    assert pooled >= min_cell


def test_site_profiles_differ_in_population(tmp_path: Path) -> None:
    def summary(profile: str) -> tuple[float, int]:
        r = generate_export(tmp_path / profile, patients=600, seed=9, site_profile=profile)
        births = [date.fromisoformat(p["birthDate"]) for p in read_type(r.out_dir, "Patient")]
        mean_age = statistics.fmean(_age(b, date(2025, 6, 30)) for b in births)
        truth = orjson.loads(r.truth_path.read_bytes())
        htn = sum(c["generated"]["patients"] for c in truth["cohorts"] if c["bucket"] == "hypertension")
        return mean_age, htn

    elderly, young = summary("elderly"), summary("young")
    assert elderly[0] > young[0] + 10
    assert elderly[1] > 1.5 * young[1]


def test_treatment_starts_fall_in_the_chosen_calendar_years(tmp_path: Path) -> None:
    def first_start_years(r) -> set[int]:
        first: dict[tuple[str, str], datetime] = {}
        for m in read_type(r.out_dir, "MedicationRequest"):
            key = (m["subject"]["reference"], m["medicationCodeableConcept"]["coding"][0]["code"])
            t = datetime.fromisoformat(m["authoredOn"])
            first[key] = min(first.get(key, t), t)
        return {t.year for t in first.values()}

    one = generate_export(tmp_path / "one", patients=400, seed=1)
    truth = orjson.loads(one.truth_path.read_bytes())
    year = int(truth["treatment_starts"]["to"][:4])
    # one packet period (a year in mappings/v1) holds every planted episode of a site
    assert first_start_years(one) == {year}
    five = generate_export(tmp_path / "five", patients=400, seed=1, start_years=5)
    assert first_start_years(five) == set(range(year - 4, year + 1))
    for gen in orjson.loads(five.truth_path.read_bytes())["cohorts"]:
        if gen["rare"]:
            assert gen["generated"]["patients"] == round(0.008 * 400)


def test_rare_cohort_size_can_be_set(tmp_path: Path) -> None:
    r = generate_export(tmp_path / "r", patients=200, seed=3, rare_patients=12)
    truth = orjson.loads(r.truth_path.read_bytes())
    assert truth["rare_cohort"]["generated"]["patients"] == truth["rare_cohort"]["expected_patients"] == 12
    none = generate_export(tmp_path / "n", patients=200, seed=3, rare_patients=0)
    key = ("hypertension", "hydrochlorothiazide", "18-39", "female")
    assert key not in independent_changes(none.out_dir)
