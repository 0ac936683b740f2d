"""Encounters: the visit rows a measure's denominator needs, and nothing else of the resource."""

from __future__ import annotations

import json

import pytest
from extract_helpers import (
    BASE_ENCOUNTER,
    BASE_OBSERVATION,
    CANARY,
    SECRET,
    all_output_bytes,
    assert_counts_add_up,
    extract,
    resource,
    write_ndjson,
)

from qis_fhir.fhir.dates import instant_us
from qis_fhir.privacy.pseudonym import Pseudonymizer

ENC = BASE_ENCOUNTER
PERIOD = BASE_ENCOUNTER["period"]

# reason -> an Encounter line that must be quarantined for it
BAD_ENCOUNTER_LINES: list[tuple[str, dict]] = [
    ("missing_id", resource(ENC, id=None)),
    ("missing_subject", resource(ENC, subject=None)),
    ("invalid_reference", resource(ENC, subject={"reference": f"Group/{CANARY}"})),
    ("invalid_field", resource(ENC, status=None)),
    ("missing_code", resource(ENC, **{"class": None})),
    ("invalid_field", resource(ENC, **{"class": [{"code": "AMB"}]})),  # a list: R5's shape, not R4's Coding
    ("missing_code", resource(ENC, **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode"}})),
    ("missing_date", resource(ENC, period=None)),
    ("missing_date", resource(ENC, period={"end": PERIOD["end"]})),
    ("invalid_field", resource(ENC, period=PERIOD["start"])),
    ("unparseable_date", resource(ENC, period={"start": f"{CANARY} monday"})),
    ("unparseable_date", resource(ENC, period={"start": PERIOD["start"], "end": "2020-03-04 10:00"})),
    ("date_out_of_range", resource(ENC, period={"start": "1812-06-01"})),
    ("invalid_field", resource(ENC, period={"start": PERIOD["end"], "end": PERIOD["start"]})),
]


def test_an_encounter_gives_one_row_of_who_when_and_what_kind(tmp_path):
    write_ndjson(tmp_path / "e", "Encounter.000.ndjson", [ENC, resource(ENC, id="enc-2", period={"start": "2021-01"})])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert records == []
    enc = tables["encounters"]
    assert list(enc.columns) == ["patient_key", "period_start", "period_end", "class_code", "status"]
    assert set(enc["patient_key"]) == {Pseudonymizer(SECRET).key(f"Patient/{CANARY}")}
    assert [t.value // 1000 for t in enc["period_start"]] == [instant_us("2020-03-04T08:00:00Z"), instant_us("2021-01-01")]
    assert enc["period_end"].iloc[0].value // 1000 == instant_us("2020-03-04T08:20:00Z")
    assert enc["period_end"].isna().tolist() == [False, True]  # an open visit keeps its start
    assert list(enc["class_code"]) == ["AMB", "AMB"] and list(enc["status"]) == ["finished", "finished"]
    assert str(enc["period_start"].dtype) == "datetime64[us, UTC]"
    assert summary["by_type"]["Encounter"] == {"read": 2, "accepted": 2, "quarantined": 0}
    assert summary["skipped_types"] == {}
    assert summary["rows"]["encounters"] == 2
    # the type's and the reason's text are never read: the canary sits in both
    assert CANARY.encode() not in all_output_bytes(tmp_path / "out")


def test_each_malformed_encounter_is_quarantined_with_its_reason(tmp_path):
    items = [ENC]
    for _, bad in BAD_ENCOUNTER_LINES:
        items += [bad, resource(ENC, id=f"ok-{len(items)}")]
    write_ndjson(tmp_path / "e", "Encounter.000.ndjson", items)
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    got = [(r["line"], r["reason"]) for r in records]
    assert got == [(2 + 2 * i, reason) for i, (reason, _) in enumerate(BAD_ENCOUNTER_LINES)]
    assert {r["resource_type"] for r in records} == {"Encounter"}
    assert len(tables["encounters"]) == len(BAD_ENCOUNTER_LINES) + 1
    assert summary["by_type"]["Encounter"]["quarantined"] == len(BAD_ENCOUNTER_LINES)
    assert_counts_add_up(summary)
    assert CANARY.encode() not in all_output_bytes(tmp_path / "out")


def test_encounters_in_a_bundle_resolve_their_urn_subject(tmp_path):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": CANARY}},
        {"resource": resource(ENC, subject={"reference": "urn:uuid:p1"})},
        {"resource": resource(BASE_OBSERVATION, subject={"reference": "urn:uuid:p1"})},
    ]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.json").write_text(json.dumps(bundle))
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert records == []
    assert list(tables["encounters"]["patient_key"]) == list(tables["patients"]["patient_key"])
    assert_counts_add_up(summary)


def test_encounter_failing_the_r4b_model_is_quarantined_by_location(tmp_path):
    bad = resource(ENC, hospitalization={"admitSource": CANARY})  # a CodeableConcept given as a string
    write_ndjson(tmp_path / "e", "Encounter.000.ndjson", [ENC, bad])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", validate="full")
    assert [(r["line"], r["reason"]) for r in records] == [(2, "model_validation_failed")]
    assert "hospitalization.admitSource" in records[0]["detail"] and CANARY not in records[0]["detail"]
    assert len(tables["encounters"]) == 1
    assert_counts_add_up(summary)


@pytest.mark.parametrize("name", ["synthea-r4-105", "synthea-bulk-10", "synthea-bundles"])
def test_every_fixture_encounter_becomes_a_row(fixtures_dir, tmp_path, name):
    export = fixtures_dir / name
    summary, records, tables = extract(export, tmp_path / "out")
    expected = sum(1 for p in export.glob("Encounter*.ndjson") for _ in p.open("rb"))
    if not expected:  # the Bundles: count the Encounter entries
        expected = sum(e["resource"]["resourceType"] == "Encounter"
                       for p in export.glob("*.json") for e in json.loads(p.read_text())["entry"])
    assert expected > 0
    assert summary["by_type"]["Encounter"] == {"read": expected, "accepted": expected, "quarantined": 0}
    assert "Encounter" not in summary["skipped_types"]
    enc = tables["encounters"]
    assert len(enc) == expected
    assert set(enc["patient_key"]) <= set(tables["patients"]["patient_key"])
    assert (enc["period_end"].isna() | (enc["period_end"] >= enc["period_start"])).all()
    assert_counts_add_up(summary)
