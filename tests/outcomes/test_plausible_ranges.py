"""Readings outside a measure's plausible range: never a baseline or follow-up, one counted episode
lost instead of a blocked night, and one definition of each range that the quality suites share."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from qis_fhir.errors import ExitCode, MappingError
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.outcomes import derive_outcome_events
from qis_fhir.quality import load_suites

MAPPING = load_mapping(MAPPINGS_ROOT / "v1")  # v1: systolic_bp [40, 300] mm[Hg], hba1c [2, 25] %
HBA1C = MAPPING.measures["hba1c"]


def test_v1_ranges_are_what_these_tests_assume():
    ranges = {m.id: (m.plausible_min, m.plausible_max) for m in MAPPING.measures.values()}
    assert ranges == {"systolic_bp": (40, 300), "total_cholesterol": (40, 1000), "hba1c": (2, 25)}


def diabetes_episode(tb, *readings, mapping=MAPPING):
    """A metformin start on day 0 for type 2 diabetes, with HbA1c ``(day, value[, unit])`` readings."""
    tb.obs(patient="x", when=1000, value=140.0)  # data runs past every window: never "pending"
    tb.patient()
    c = tb.condition(code="44054006", onset=-400)
    tb.request(code="860975", when=0, reasons=[c])
    for when, value, *unit in readings:
        tb.obs(when=when, value=value, code=HBA1C.loinc, unit=unit[0] if unit else HBA1C.unit, panel=None)
    return derive_outcome_events(tb.tables(), mapping)


def test_a_plausible_reading_beside_an_implausible_one_is_used(tb):
    tb.patient()
    c = tb.condition(onset=-400)
    tb.request(when=0, reasons=[c])
    tb.obs(when=-20, value=155.0)
    tb.obs(when=-2, value=900.0)  # nearer the start, but no systolic pressure is 900
    tb.obs(when=30, value=14.0)  # the first in the follow-up window, and no systolic pressure is 14
    tb.obs(when=60, value=140.0)
    result = derive_outcome_events(tb.tables(), MAPPING)
    ev = result.events.iloc[0]
    assert (ev.baseline_value, ev.baseline_days, ev.followup_value, ev.followup_days) == (155.0, 20, 140.0, 60)
    assert result.summary["observations"]["implausible"] == 2
    assert result.summary["observations"]["used"] == 2


def test_an_hba1c_of_26_percent_as_the_only_baseline_excludes_its_episode(tb):
    result = diabetes_episode(tb, (-10, 26.0), (100, 7.0))
    s = result.summary
    assert result.events.empty
    assert s["exclusion_reasons"]["baseline_implausible"] == 1
    assert s["by_measure"]["hba1c"]["excluded"]["baseline_implausible"] == 1
    assert s["totals"]["events"] + s["totals"]["excluded"] == s["totals"]["episodes"] == 1


def test_only_an_implausible_followup_excludes_as_followup_implausible(tb):
    result = diabetes_episode(tb, (-10, 7.5), (100, 0.7))  # 0.7: a fraction sent where a percentage belongs
    assert result.events.empty
    assert result.summary["exclusion_reasons"]["followup_implausible"] == 1


@pytest.mark.parametrize(
    ("value", "used"), [(25.0, True), (25.01, False), (2.0, True), (1.99, False)],
    ids=["max-inclusive", "above-max", "min-inclusive", "below-min"],
)
def test_range_ends_are_inclusive(tb, value, used):
    result = diabetes_episode(tb, (-10, value), (100, 7.0))
    assert result.events["baseline_value"].tolist() == ([value] if used else [])
    assert result.summary["exclusion_reasons"]["baseline_implausible"] == int(not used)


def test_a_reading_in_another_unit_explains_before_an_implausible_one(tb):
    result = diabetes_episode(tb, (-10, 26.0), (-5, 58.0, "mmol/mol"), (100, 7.0))
    assert result.summary["exclusion_reasons"]["baseline_unit_mismatch"] == 1
    assert result.summary["exclusion_reasons"]["baseline_implausible"] == 0


# --- one definition of each range -----------------------------------------------------------------

@pytest.fixture
def v1(tmp_path) -> Path:
    """A private copy of mappings/v1 to change."""
    return Path(shutil.copytree(MAPPINGS_ROOT / "v1", tmp_path / "v1"))


def measure_range_rules(suites, measure):
    """(table, column) -> (min, max) of the range rules on one measure's readings."""
    m = measure
    found = {}
    for rule in suites.tables["observations"]:
        if rule.name == "plausible_range" and rule.where.get("code") == (m.loinc,) and rule.where.get("unit", (m.unit,)) == (m.unit,):
            found[("observations", rule.column)] = (rule.args["min"], rule.args["max"])
    for rule in suites.tables["outcome_events"]:
        if rule.where == {"measure": (m.id,)}:
            found[("outcome_events", rule.column)] = (rule.args["min"], rule.args["max"])
    return found


def test_quality_suites_take_every_measure_range_from_outcomes_yaml():
    suites = load_suites(MAPPING)
    for m in MAPPING.measures.values():
        assert measure_range_rules(suites, m) == {
            ("observations", "value"): (m.plausible_min, m.plausible_max),
            ("outcome_events", "baseline_value"): (m.plausible_min, m.plausible_max),
            ("outcome_events", "followup_value"): (m.plausible_min, m.plausible_max),
        }, m.id


def test_changing_a_range_in_outcomes_yaml_changes_the_stage_and_both_suites(v1, tb):
    text = (v1 / "outcomes.yaml").read_text()
    assert text.count("plausible_range: [2, 25]") == 1
    (v1 / "outcomes.yaml").write_text(text.replace("plausible_range: [2, 25]", "plausible_range: [3, 20]"))
    mapping = load_mapping(v1)
    assert set(measure_range_rules(load_suites(mapping), mapping.measures["hba1c"]).values()) == {(3, 20)}

    result = diabetes_episode(tb, (-10, 22.0), (100, 7.0), mapping=mapping)  # 22 %: plausible under v1, not here
    assert result.summary["exclusion_reasons"]["baseline_implausible"] == 1
    assert len(derive_outcome_events(tb.tables(), MAPPING).events) == 1


@pytest.mark.parametrize("occurrence", [0, 1], ids=["observations", "outcome_events"])
def test_a_quality_range_that_disagrees_with_the_measure_is_refused_at_load(v1, occurrence):
    path = v1 / "quality.yaml"
    lines = path.read_text().splitlines(keepends=True)
    refs = [i for i, ln in enumerate(lines) if ln.strip() == "max: $mapping.measures.hba1c.plausible_max"]
    assert len(refs) == 2  # one on observations, one on outcome_events
    lines[refs[occurrence]] = lines[refs[occurrence]].replace("$mapping.measures.hba1c.plausible_max", "30")
    path.write_text("".join(lines))
    with pytest.raises(MappingError) as info:
        load_suites(load_mapping(v1))
    assert info.value.exit_code == ExitCode.MAPPING_INVALID
    msg = str(info.value)
    assert msg.startswith("quality.yaml:") and "of measure hba1c is [2, 30], but outcomes.yaml gives plausible_range [2, 25]" in msg

    # the same figure as outcomes.yaml, written out, is accepted: what matters is that they agree
    path.write_text("".join(lines).replace("max: 30", "max: 25"))
    load_suites(load_mapping(v1))


# --- a whole night -----------------------------------------------------------------------------

def _plant_implausible_baseline(export: Path, mapping, value: float) -> None:
    """Replace the only HbA1c baseline reading of one patient with one diabetes treatment by ``value``.

    Read from the export as a clinician would: the first request of the treatment starts the episode,
    the baseline window is [start - baseline_days, start] in calendar days; the patient must also have
    a follow-up reading, so the episode would otherwise be an event.
    """
    codes = {c: t.id for t in mapping.treatments.values()
             if any(HBA1C.id in mapping.buckets[b].measures for b in t.buckets) for c in t.rxnorm}
    starts, treatments = {}, defaultdict(set)
    for line in (export / "MedicationRequest.000.ndjson").open():
        req = json.loads(line)
        code = req["medicationCodeableConcept"]["coding"][0]["code"]
        if code in codes:
            who, day = req["subject"]["reference"], pd.Timestamp(req["authoredOn"]).normalize()
            treatments[who].add(codes[code])
            starts[who] = min(starts.get(who, day), day)
    path = export / "Observation.000.ndjson"
    lines = path.read_text().splitlines(keepends=True)
    readings = defaultdict(list)  # patient -> (day offset from the start, line index)
    for i, line in enumerate(lines):
        obs = json.loads(line)
        who = obs["subject"]["reference"]
        if obs["code"]["coding"][0]["code"] == HBA1C.loinc and len(treatments.get(who, ())) == 1:
            offset = (pd.Timestamp(obs["effectiveDateTime"]).normalize() - starts[who]).days
            readings[who].append((offset, i))
    for who, rs in readings.items():
        baseline = [i for d, i in rs if -HBA1C.baseline_days <= d <= 0]
        followup = [i for d, i in rs if HBA1C.followup_min_days <= d <= HBA1C.followup_max_days]
        if len(baseline) == 1 and followup:
            obs = json.loads(lines[baseline[0]])
            obs["valueQuantity"]["value"] = value
            lines[baseline[0]] = json.dumps(obs) + "\n"
            path.write_text("".join(lines))
            return
    raise AssertionError("the synthetic export has no treated patient with one HbA1c baseline")


def test_a_night_with_an_implausible_baseline_completes_and_counts_the_episode(tmp_path):
    """One HbA1c of 26 % as an event's only baseline, end to end: the night publishes, the episode is
    excluded as baseline_implausible and it is the only episode the value costs."""
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.pipeline import RunConfig, run_pipeline
    from qis_fhir.stages import quality_report_path
    from qis_fhir.synth import generate_export

    export = tmp_path / "export"
    generate_export(export, patients=120, seed=5)  # 129 HbA1c rows: one bad one is under 1 %
    extract_export(export, tmp_path / "clean", secret=b"s" * 32, validate="off")
    clean = derive_outcome_events(load_extract(tmp_path / "clean"), MAPPING).summary
    _plant_implausible_baseline(export, MAPPING, 26.0)

    result = run_pipeline(RunConfig(export_dir=export, out_dir=tmp_path / "out", site_secret_path=tmp_path / "s",
                                    mapping_dir=MAPPING.path))
    s = result.outcomes
    assert result.quality["success"] is True and result.quality["warnings"] == 1
    obs = s["observations"]
    assert obs["implausible"] == 1 and obs["candidates"] == sum(n for k, n in obs.items() if k != "candidates")
    assert s["totals"]["episodes"] == clean["totals"]["episodes"]
    assert s["totals"]["events"] == clean["totals"]["events"] - 1
    assert s["exclusion_reasons"] == {**clean["exclusion_reasons"], "baseline_implausible": 1}
    assert s["totals"]["events"] + s["totals"]["excluded"] == s["totals"]["episodes"]
    assert s["by_measure"]["hba1c"]["excluded"]["baseline_implausible"] == 1
    summary = json.loads((tmp_path / "out" / "outcome_summary.json").read_text())
    assert summary["exclusion_reasons"]["baseline_implausible"] == 1
    events = pd.read_parquet(tmp_path / "out" / "outcome_events.parquet")
    assert len(events) == s["totals"]["events"] and 26.0 not in set(events["baseline_value"])
    report = json.loads(quality_report_path(tmp_path / "out", "extract").read_text())
    (warned,) = [r for r in report["tables"]["observations"]["results"] if r["warning"]]
    assert warned["expectation"] == "plausible_range" and warned["unexpected_count"] == 1
