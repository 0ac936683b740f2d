"""Reading an export folder: bulk names, parts, gzip, untyped NDJSON, Bundles, files that are not data."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from extract_helpers import (
    BASE_CONDITION,
    BASE_OBSERVATION,
    BASE_PATIENT,
    BASE_REQUEST,
    CANARY,
    SECRET,
    assert_counts_add_up,
    extract,
    label,
    resource,
    write_ndjson,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_fhir.errors import InputNotFoundError
from qis_fhir.fhir import TABLES, extract_export
from qis_fhir.fhir.sources import Labeller, discover, line_blocks
from qis_fhir.privacy.pseudonym import Pseudonymizer

KEY = Pseudonymizer(SECRET).key


def test_multi_part_and_gzip_files_are_all_read(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Observation.000.ndjson", [resource(BASE_OBSERVATION, id=f"a{i}") for i in range(3)])
    write_ndjson(e, "Observation.001.ndjson.gz", [resource(BASE_OBSERVATION, id=f"b{i}") for i in range(4)])
    write_ndjson(e, "Observation.ndjson.gz", [resource(BASE_OBSERVATION, id="c")])
    write_ndjson(e, "Patient.ndjson", [BASE_PATIENT])
    summary, records, tables = extract(e, tmp_path / "out")
    assert records == []
    assert summary["by_type"]["Observation"] == {"read": 8, "accepted": 8, "quarantined": 0}
    assert set(summary["by_file"]) == {"Observation.000.ndjson", "Observation.001.ndjson.gz",
                                       "Observation.ndjson.gz", "Patient.ndjson"}
    assert len(tables["observations"]) == 8
    obs = tables["observations"]
    assert len(obs.groupby(["source_file", "source_line"])) == 8  # each row says where it was read
    assert sorted(obs.loc[obs.source_file == "Observation.001.ndjson.gz", "source_line"]) == [1, 2, 3, 4]
    assert_counts_add_up(summary)


def test_rows_carry_keys_codes_and_utc_timestamps(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Patient.ndjson", [BASE_PATIENT])
    write_ndjson(e, "Condition.ndjson", [BASE_CONDITION])
    write_ndjson(e, "MedicationRequest.ndjson", [resource(BASE_REQUEST, reasonCode=[
        {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}])])
    write_ndjson(e, "Observation.ndjson", [resource(BASE_OBSERVATION, valueQuantity={
        "value": 5, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"})])
    summary, records, t = extract(e, tmp_path / "out")
    assert records == []
    pk = KEY(f"Patient/{CANARY}")
    p = t["patients"].iloc[0]
    assert (p["patient_key"], p["sex"], str(p["birth_date"])) == (pk, "female", "1950-06-01 00:00:00+00:00")
    assert p["deceased"] is None or str(p["deceased"]) == "NaT"
    cond = t["conditions"]
    # both SNOMED CT and ICD-10-CM codings give a row, so a mapping can match either
    assert sorted(zip(cond["code_system"], cond["code"])) == [
        ("http://hl7.org/fhir/sid/icd-10-cm", "I10"), ("http://snomed.info/sct", "38341003")]
    assert set(cond["condition_key"]) == {KEY("Condition/cond-1")}
    assert str(cond["onset"].iloc[0]) == "2019-05-01 00:00:00+00:00"
    assert cond["clinical_status"].iloc[0] == "active"
    req = t["medication_requests"].iloc[0]
    assert list(req["reason_condition_keys"]) == [KEY("Condition/cond-1")]  # joins conditions.condition_key
    assert list(req["reason_codes"]) == ["http://snomed.info/sct|38341003"]
    assert (req["code"], req["status"], req["intent"]) == ("316049", "active", "order")
    assert str(req["authored_on"]) == "2019-05-02 10:00:00+00:00"
    obs = t["observations"].iloc[0]
    assert (obs["patient_key"], obs["code"], obs["value"], obs["unit"]) == (pk, "2093-3", 5.0, "mg/dL")
    assert str(obs["effective"]) == "2020-01-02 03:04:05+00:00"
    for name, schema in TABLES.items():  # the Parquet files carry exactly the contract's schema
        assert pq.read_schema(tmp_path / "out" / "extract" / f"{name}.parquet").equals(schema, check_metadata=False)


def test_timezone_offsets_become_utc(tmp_path):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [resource(BASE_OBSERVATION, effectiveDateTime="2020-01-02T03:04:05-05:00")])
    _, _, t = extract(tmp_path / "e", tmp_path / "out")
    assert str(t["observations"]["effective"].iloc[0]) == "2020-01-02 08:04:05+00:00"


def test_untyped_ndjson_uses_each_lines_resource_type_and_hides_the_file_name(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, f"{CANARY}-export.ndjson", [BASE_PATIENT, BASE_OBSERVATION, {"resourceType": "Procedure", "id": "e1"}])
    summary, records, t = extract(e, tmp_path / "out")
    assert list(summary["by_file"]) == [label(f"{CANARY}-export.ndjson")]
    assert CANARY not in label(f"{CANARY}-export.ndjson")
    assert summary["skipped_types"] == {"Procedure": 1}
    assert len(t["patients"]) == 1 and len(t["observations"]) == 1
    assert_counts_add_up(summary)


def test_files_of_other_types_are_counted_as_skipped_without_parsing(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Procedure.000.ndjson", [{"resourceType": "Procedure", "id": "1"}, b"not even json"])
    write_ndjson(e, "Observation.ndjson", [BASE_OBSERVATION])
    (e / "LICENSE").write_text("Apache-2.0")
    summary, records, _ = extract(e, tmp_path / "out")
    assert summary["by_file"]["Procedure.000.ndjson"] == {"read": 2, "accepted": 0, "quarantined": 0, "skipped": 2}
    assert summary["skipped_types"] == {"Procedure": 2}
    assert summary["skipped_paths"] == {"not_fhir_data": 1}
    assert "Procedure" not in summary["by_type"]
    assert_counts_add_up(summary)


def test_bulk_manifest_json_is_ignored(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Observation.ndjson", [BASE_OBSERVATION])
    (e / "manifest.json").write_text(json.dumps({"transactionTime": "2020-01-01T00:00:00Z", "request": "x", "output": []}))
    summary, records, _ = extract(e, tmp_path / "out")
    assert records == [] and summary["skipped_paths"] == {"bulk_manifest": 1}
    assert list(summary["by_file"]) == ["Observation.ndjson"]


def test_bundle_resolves_urn_uuid_references_to_the_same_keys_as_ndjson(tmp_path):
    def entry(res):
        return {"fullUrl": f"urn:uuid:{res['id']}", "resource": res, "request": {"method": "POST", "url": res["resourceType"]}}

    subject = {"reference": f"urn:uuid:{CANARY}"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        entry(BASE_PATIENT),
        entry(resource(BASE_CONDITION, subject=subject)),
        entry(resource(BASE_REQUEST, subject=subject, reasonReference=[{"reference": "urn:uuid:cond-1"}])),
        entry(resource(BASE_OBSERVATION, subject=subject)),
        entry({"resourceType": "Claim", "id": "c1"}),
    ]}
    e = tmp_path / "e"
    e.mkdir()
    (e / f"Jane_Doe_{CANARY}.json").write_text(json.dumps(bundle))
    summary, records, t = extract(e, tmp_path / "out")
    assert records == []
    assert summary["by_file"] == {label(f"Jane_Doe_{CANARY}.json"): {"read": 5, "accepted": 4, "quarantined": 0, "skipped": 1}}
    pk = KEY(f"Patient/{CANARY}")
    assert set(t["patients"]["patient_key"]) == {pk}
    assert set(t["observations"]["patient_key"]) == {pk}
    assert list(t["medication_requests"]["reason_condition_keys"].iloc[0]) == [KEY("Condition/cond-1")]
    assert set(t["conditions"]["condition_key"]) == {KEY("Condition/cond-1")}


def test_single_resource_json_file_and_broken_json_file(tmp_path):
    e = tmp_path / "e"
    e.mkdir()
    (e / "a.json").write_text(json.dumps(BASE_OBSERVATION))
    (e / "b.json").write_bytes(b'{"resourceType": "Bundle", "entry": [')
    summary, records, t = extract(e, tmp_path / "out")
    assert len(t["observations"]) == 1
    assert [(r["file"], r["line"], r["reason"]) for r in records] == [(label("b.json"), 0, "invalid_json")]
    assert_counts_add_up(summary)


def test_many_chunks_write_every_row(tmp_path):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [resource(BASE_OBSERVATION, id=f"o{i}") for i in range(2500)])
    summary, _, t = extract(tmp_path / "e", tmp_path / "out", chunk_rows=100)
    assert summary["rows"]["observations"] == len(t["observations"]) == 2500


def test_always_writes_all_four_tables_even_when_empty(tmp_path):
    write_ndjson(tmp_path / "e", "Patient.ndjson", [BASE_PATIENT])
    _, _, t = extract(tmp_path / "e", tmp_path / "out")
    assert set(t) == set(TABLES)
    assert len(t["observations"]) == 0 and list(t["observations"].columns) == TABLES["observations"].names


def test_missing_or_empty_export_dir_raises_input_not_found(tmp_path):
    with pytest.raises(InputNotFoundError):
        extract_export(tmp_path / "nope", tmp_path / "out", secret=SECRET)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no data")
    with pytest.raises(InputNotFoundError):
        extract_export(tmp_path / "empty", tmp_path / "out", secret=SECRET)


def test_rerun_replaces_outputs_and_leaves_no_partial_files(tmp_path):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION, b"{bad"])
    extract(tmp_path / "e", tmp_path / "out")
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION])
    summary, records, t = extract(tmp_path / "e", tmp_path / "out")
    assert records == [] and len(t["observations"]) == 1
    assert not [p for p in (tmp_path / "out").rglob(".*partial")]


MEDICATION = {"resourceType": "Medication", "id": "med-1",
              "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]}}


def test_medication_reference_resolves_through_medication_resources(tmp_path):
    e = tmp_path / "e"
    by_ref = resource(BASE_REQUEST, id="r1", medicationCodeableConcept=None,
                      medicationReference={"reference": "Medication/med-1"})
    contained = resource(BASE_REQUEST, id="r2", medicationCodeableConcept=None,
                         medicationReference={"reference": "#m"}, contained=[dict(MEDICATION, id="m")])
    unknown = resource(BASE_REQUEST, id="r3", medicationCodeableConcept=None,
                       medicationReference={"reference": "Medication/elsewhere"})
    write_ndjson(e, "Medication.ndjson", [MEDICATION])
    write_ndjson(e, "MedicationRequest.000.ndjson", [by_ref, contained, unknown])
    summary, records, t = extract(e, tmp_path / "out", validate="full")
    assert list(t["medication_requests"]["code"]) == ["860975", "860975"]
    assert [(r["line"], r["reason"]) for r in records] == [(3, "missing_code")]
    assert summary["accepted_without_rows"] == {"Medication": 1}
    assert_counts_add_up(summary)


def test_bundle_medication_after_its_request_still_resolves(tmp_path):
    request = resource(BASE_REQUEST, medicationCodeableConcept=None, medicationReference={"reference": "urn:uuid:m1"},
                       subject={"reference": "urn:uuid:p1"})
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": BASE_PATIENT},
        {"fullUrl": "urn:uuid:r1", "resource": request},
        {"fullUrl": "urn:uuid:m1", "resource": MEDICATION},
    ]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.json").write_text(json.dumps(bundle))
    summary, records, t = extract(tmp_path / "e", tmp_path / "out")
    assert records == []
    assert list(t["medication_requests"]["code"]) == ["860975"]
    assert set(t["medication_requests"]["patient_key"]) == {KEY(f"Patient/{CANARY}")}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 24), st.booleans(), st.booleans())
def test_line_blocks_give_every_line_once_and_mark_overlong_ones(tmp_path_factory, lengths, cap, final_newline,
                                                                 gz):
    """Whatever the cap (the block size follows it, so lines straddle blocks) and file ending, the
    blocks hold exactly the file's lines in order, with None where a line is over the cap."""
    lines = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("blocks") / ("Observation.ndjson.gz" if gz else "Observation.ndjson")
    path.write_bytes(gzip.compress(data) if gz else data)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # text after the last newline is a line; nothing after it is not
    seen = []
    reported = []
    (src,), _ = discover(path.parent, Labeller(SECRET))
    for block in line_blocks(src, cap, reported.append):
        assert block
        seen.extend(block)
    assert seen == [line if len(line) <= cap else None for line in lines]
    assert sum(reported) == path.stat().st_size
