"""The three Synthea fixture folders extract with counts that add up and nothing identifying kept."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from extract_helpers import all_output_bytes, assert_counts_add_up, extract


@pytest.fixture(scope="module")
def r4_105(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("r4-105")
    return fixtures_dir / "synthea-r4-105", out, *extract(fixtures_dir / "synthea-r4-105", out, validate="sample")


def _raw_ids(export, pattern="*.ndjson"):
    ids = []
    for path in export.glob(pattern):
        for line in path.open("rb"):
            ids.append(orjson.loads(line)["id"])
    return ids


def test_r4_105_counts_match_the_fixture_and_add_up(r4_105):
    _, _, summary, records, tables = r4_105
    assert_counts_add_up(summary)
    assert summary["by_type"]["Observation"]["read"] == 14195
    assert summary["by_type"]["Condition"] == {"read": 783, "accepted": 783, "quarantined": 0}
    assert summary["by_type"]["MedicationRequest"] == {"read": 957, "accepted": 957, "quarantined": 0}
    assert summary["by_type"]["Patient"] == {"read": 105, "accepted": 105, "quarantined": 0}
    assert summary["by_type"]["Encounter"] == {"read": 3391, "accepted": 3391, "quarantined": 0}
    assert summary["skipped_types"] == {}
    # 64 BP panels whose components carry no unit at all, 30 MMSE totals in "(score)" (not UCUM)
    assert summary["quarantine_reasons"] == {"missing_unit": 64, "unknown_unit": 30}
    assert len(records) == 94
    assert summary["accepted_without_rows"] == {"Observation": 1056}  # coded and text Observations
    assert summary["rows"] == {name: len(df) for name, df in tables.items()}


def test_r4_105_systolic_rows_come_from_bp_panel_components(r4_105):
    obs = r4_105[4]["observations"]
    systolic = obs[obs["code"] == "8480-6"]
    assert len(systolic) == 928
    assert set(systolic["panel_code"]) == {"55284-4"}
    assert set(systolic["unit"]) == {"mm[Hg]"}
    assert systolic["value"].between(60, 250).all()
    assert obs.loc[obs["panel_code"].isna(), "code"].str.len().gt(0).all()


def test_r4_105_no_raw_id_reaches_any_output(r4_105):
    export, out, *_ = r4_105
    blob = all_output_bytes(out)
    ids = _raw_ids(export, "Patient*.ndjson")
    assert len(ids) == 105
    for rid in ids:
        assert rid.encode() not in blob
    # nor the ids of the extracted resources themselves
    for rid in _raw_ids(export, "Condition*.ndjson")[:100]:
        assert rid.encode() not in blob


def test_bulk_10_extracts_with_reason_references_joining_conditions(fixtures_dir, tmp_path):
    summary, records, t = extract(fixtures_dir / "synthea-bulk-10", tmp_path / "out")
    assert_counts_add_up(summary)
    assert records == []
    assert summary["by_type"]["Patient"]["accepted"] == 13
    assert t["patients"]["deceased"].notna().sum() > 0
    req = t["medication_requests"]
    linked = req[req["reason_condition_keys"].map(len) > 0]
    assert len(linked) == 1692
    keys = set(t["conditions"]["condition_key"])
    assert all(k in keys for ks in linked["reason_condition_keys"] for k in ks)
    for rid in _raw_ids(fixtures_dir / "synthea-bulk-10", "Patient*.ndjson"):
        assert rid.encode() not in all_output_bytes(tmp_path / "out")


def test_bundles_resolve_urns_and_hide_patient_file_names(fixtures_dir, tmp_path):
    export = fixtures_dir / "synthea-bundles"
    summary, records, t = extract(export, tmp_path / "out")
    assert_counts_add_up(summary)
    assert len(summary["by_file"]) == 2
    assert all(re.fullmatch(r"json-file-[0-9a-f]{16}", name) for name in summary["by_file"])
    assert len(t["patients"]) == 2
    patient_keys = set(t["patients"]["patient_key"])
    for name in ("conditions", "medication_requests", "observations"):
        assert len(t[name]) > 0 and set(t[name]["patient_key"]) <= patient_keys, name
    cond_keys = set(t["conditions"]["condition_key"])
    refs = [k for ks in t["medication_requests"]["reason_condition_keys"] for k in ks]
    assert refs and set(refs) <= cond_keys
    blob = all_output_bytes(tmp_path / "out")
    for path in export.glob("*.json"):
        bundle = json.loads(path.read_text())
        pid = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        assert pid.encode() not in blob
        assert path.stem.split("_")[0].encode() not in blob  # the patient's name in the file name
