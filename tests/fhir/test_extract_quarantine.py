"""Every quarantine reason, each from a real malformed line; nothing quoted from the input; counts add up."""

from __future__ import annotations

import gzip
import json

import pytest
from extract_helpers import (
    BASE_OBSERVATION,
    BASE_PATIENT,
    BP_PANEL,
    CANARY,
    all_output_bytes,
    assert_counts_add_up,
    extract,
    label,
    resource,
    write_ndjson,
)

from qis_fhir.fhir.reasons import ALL_REASONS

OBS = BASE_OBSERVATION
UCUM = "http://unitsofmeasure.org"

# reason -> a line of Observation.000.ndjson that must be quarantined for it
BAD_OBSERVATION_LINES: dict[str, bytes | dict] = {
    "not_utf8": b'{"resourceType":"Observation","id":"x","note":"\xff\xfe' + CANARY.encode() + b'"}',
    "blank_line": b"   \t",
    "invalid_json": b'{"resourceType":"Observation","id":"' + CANARY.encode() + b'",',
    "not_an_object": b'["Observation","' + CANARY.encode() + b'"]',
    "wrong_resource_type": BASE_PATIENT,
    "missing_id": resource(OBS, id=None),
    "missing_subject": resource(OBS, subject=None),
    "invalid_reference": resource(OBS, subject={"reference": f"Group/{CANARY}"}),
    "missing_code": resource(OBS, code={"text": CANARY}),
    "missing_date": resource(OBS, effectiveDateTime=None, issued=None),
    "unparseable_date": resource(OBS, effectiveDateTime=f"{CANARY} last tuesday"),
    "date_out_of_range": resource(OBS, effectiveDateTime="9999-12-31T23:59:59-12:00"),  # valid FHIR, year 10000 in UTC
    "missing_unit": resource(OBS, valueQuantity={"value": 1.0, "system": UCUM}),
    "unknown_unit": resource(OBS, valueQuantity={"value": 1.0, "unit": "(score)", "system": UCUM, "code": "(score)"}),
    "missing_value": resource(OBS, valueQuantity={"unit": "mg/dL", "system": UCUM, "code": "mg/dL"}),
    "invalid_value": resource(OBS, valueQuantity={"value": CANARY, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}),
    "invalid_field": resource(OBS, status=7),
}


@pytest.fixture
def quarantined(tmp_path):
    items = [OBS]
    for bad in BAD_OBSERVATION_LINES.values():
        items.append(bad)
        items.append(resource(OBS, id=f"ok-{len(items)}"))
    write_ndjson(tmp_path / "export", "Observation.000.ndjson", items)
    summary, records, tables = extract(tmp_path / "export", tmp_path / "out")
    return summary, records, tables, tmp_path / "out"


def test_each_malformed_line_is_quarantined_with_its_reason_file_and_line(quarantined):
    summary, records, tables, _ = quarantined
    by_line = {r["line"]: r for r in records}
    for i, reason in enumerate(BAD_OBSERVATION_LINES):
        record = by_line[2 + 2 * i]  # line 1 is good; bad lines alternate with good ones
        assert record["reason"] == reason
        assert record["file"] == "Observation.000.ndjson"
        assert record["resource_type"] == "Observation"
        assert record["detail"]
    assert len(records) == len(BAD_OBSERVATION_LINES)
    assert len(tables["observations"]) == len(BAD_OBSERVATION_LINES) + 1  # every good line kept
    assert summary["quarantine_reasons"] == {r: 1 for r in BAD_OBSERVATION_LINES}
    assert_counts_add_up(summary)


def test_quarantine_and_summary_never_quote_the_input(quarantined):
    *_, out = quarantined
    assert CANARY.encode() not in all_output_bytes(out)


def test_overlong_line_is_not_parsed_and_the_next_line_still_is(tmp_path):
    huge = resource(OBS, id="huge", note=[{"text": "x" * 5000}])
    write_ndjson(tmp_path / "e", "Observation.ndjson", [OBS, huge, resource(OBS, id="after")])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", max_line_bytes=4096)
    assert [(r["line"], r["reason"]) for r in records] == [(2, "line_too_long")]
    assert len(tables["observations"]) == 2
    assert_counts_add_up(summary)


def test_default_cap_rejects_a_line_over_one_mebibyte(tmp_path):
    huge = resource(OBS, id="huge", note=[{"text": "x" * (1 << 20)}])
    write_ndjson(tmp_path / "e", "Observation.ndjson", [huge, OBS])
    summary, records, _ = extract(tmp_path / "e", tmp_path / "out")
    assert [r["reason"] for r in records] == ["line_too_long"]
    assert summary["by_type"]["Observation"] == {"read": 2, "accepted": 1, "quarantined": 1}


def test_overlong_last_line_without_newline(tmp_path):
    path = tmp_path / "e" / "Observation.ndjson"
    path.parent.mkdir()
    path.write_bytes(b'{"resourceType":"Observation"}\n' + b"x" * 10_000)  # no final newline
    summary, records, _ = extract(tmp_path / "e", tmp_path / "out", max_line_bytes=4096)
    assert [(r["line"], r["reason"]) for r in records] == [(1, "missing_id"), (2, "line_too_long")]
    assert_counts_add_up(summary)


def test_truncated_gzip_ends_the_file_with_corrupt_file(tmp_path):
    import json
    import random

    rng = random.Random(3)  # random values: the stream must be long enough to fail mid-file
    lines = [json.dumps(resource(OBS, id=f"o{i}-{rng.random()}", issued=str(rng.random()))).encode() for i in range(20000)]
    data = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "e" / "Observation.000.ndjson.gz"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) * 3 // 4])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert records[-1]["reason"] == "corrupt_file"
    assert summary["quarantine_reasons"] == {"corrupt_file": 1}
    # every line before the damage is read, but for at most one 64 KiB buffer fill lost with it
    import zlib

    readable = zlib.decompressobj(31).decompress(path.read_bytes()).count(b"\n")
    shortest = min(len(line) for line in lines) + 1
    assert readable - (64 << 10) // shortest - 1 <= len(tables["observations"]) <= readable
    assert_counts_add_up(summary)


def test_model_validation_failure_reports_location_not_value(tmp_path):
    # category must be a list of CodeableConcepts: the strict checks do not read it, the model does
    bad = resource(OBS, id="bad", category=CANARY)
    write_ndjson(tmp_path / "e", "Observation.ndjson", [OBS, bad])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", validate="full")
    assert [(r["line"], r["reason"]) for r in records] == [(2, "model_validation_failed")]
    assert "category" in records[0]["detail"]
    assert CANARY not in records[0]["detail"]
    assert summary["validated"] == 2 and summary["validate"] == "full"
    # the same line passes when model validation is off: only the model catches it
    summary_off, records_off, _ = extract(tmp_path / "e", tmp_path / "out-off", validate="off")
    assert records_off == [] and summary_off["validated"] == 0


def test_sampled_lines_are_validated_in_batches_and_every_one_settles(tmp_path):
    """Sampled lines wait for a batch of validations (``VALIDATE_BATCH``) and the last, partial batch
    settles when its file ends: each is accepted with its rows or quarantined, none is lost."""
    from qis_fhir.fhir.extract import VALIDATE_BATCH

    n = 2 * VALIDATE_BATCH + 7
    bad_lines = {5, VALIDATE_BATCH + 3, n}  # one in each batch, the last in the partial one
    lines = [resource(OBS, id=f"o{i}", category=CANARY) if i in bad_lines else resource(BP_PANEL, id=f"o{i}")
             for i in range(1, n + 1)]
    write_ndjson(tmp_path / "e", "Observation.000.ndjson", lines)
    write_ndjson(tmp_path / "e", "Observation.001.ndjson", [OBS])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", validate="full")
    assert sorted((r["file"], r["line"]) for r in records) == [("Observation.000.ndjson", i) for i in sorted(bad_lines)]
    assert {r["reason"] for r in records} == {"model_validation_failed"}
    assert summary["by_file"]["Observation.000.ndjson"] == {"read": n, "accepted": n - 3, "quarantined": 3, "skipped": 0}
    assert summary["validated"] == n + 1
    obs = tables["observations"]
    assert len(obs) == 2 * (n - 3) + 1  # two components per panel, one value for the other file's line
    assert not set(obs.source_line[obs.source_file == "Observation.000.ndjson"]) & bad_lines
    assert_counts_add_up(summary)


def test_deep_nesting_is_read_as_orjson_reads_it(tmp_path):
    """A 1,000-deep field the pipeline does not read is valid JSON (orjson's limit is 1,024 levels):
    the line is accepted; 2,000 deep is quarantined as invalid JSON. Neither stops the extraction
    (the fast path's decoder raised RecursionError on both before it declined them)."""
    path = tmp_path / "e" / "Observation.ndjson"
    path.parent.mkdir()
    line = json.dumps(OBS)[:-1] + ', "extension": NESTED}'
    path.write_text("".join(line.replace("NESTED", "[" * d + "]" * d) + "\n" for d in (1000, 2000)))
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert [(r["line"], r["reason"]) for r in records] == [(2, "invalid_json")]
    assert len(tables["observations"]) == 1
    assert_counts_add_up(summary)


def test_deep_nesting_in_a_bundle_entry_is_read_and_refused_only_by_validation(tmp_path):
    """ijson builds any depth; a 5,000-deep field the pipeline does not read leaves the entry usable,
    but a validated entry must be written back as JSON, which orjson refuses past 255 levels: that
    entry is quarantined, and nothing raises."""
    deep = json.dumps(OBS)[:-1] + ', "extension": ' + "[" * 5000 + "]" * 5000 + "}"
    doc = '{"resourceType": "Bundle", "entry": [{"resource": ' + deep + '}, {"resource": ' + json.dumps(OBS) + "}]}"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.json").write_text(doc)
    summary, records, tables = extract(tmp_path / "e", tmp_path / "full", validate="full")
    assert [(r["line"], r["reason"]) for r in records] == [(1, "invalid_json")]
    assert list(tables["observations"]["source_line"]) == [2]
    summary_off, records_off, tables_off = extract(tmp_path / "e", tmp_path / "off", validate="off")
    assert records_off == [] and len(tables_off["observations"]) == 2
    assert_counts_add_up(summary)


def test_unresolved_urn_in_a_bundle_is_invalid_reference(tmp_path):
    import json

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:aaa", "resource": resource(OBS, subject={"reference": "urn:uuid:not-in-bundle"})},
    ]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.json").write_text(json.dumps(bundle))
    summary, records, _ = extract(tmp_path / "e", tmp_path / "out")
    assert [(r["file"], r["line"], r["reason"]) for r in records] == [(label("b.json"), 1, "invalid_reference")]


def test_every_declared_reason_is_covered_by_a_test():
    # the last two: test_extract_privacy.py (an unreadable Bundle), test_extract_bounds.py (the entry cap)
    covered = set(BAD_OBSERVATION_LINES) | {"line_too_long", "corrupt_file", "model_validation_failed",
                                            "unreadable_file", "too_many_entries"}
    assert covered == set(ALL_REASONS)


def test_component_without_unit_is_dropped_and_counted_when_another_value_remains(tmp_path):
    panel = resource(BP_PANEL)
    del panel["component"][0]["valueQuantity"]["unit"], panel["component"][0]["valueQuantity"]["code"]
    write_ndjson(tmp_path / "e", "Observation.ndjson", [panel])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert records == []
    assert summary["dropped_components"] == {"missing_unit": 1}
    obs = tables["observations"]
    assert list(obs["code"]) == ["8480-6"] and list(obs["panel_code"]) == ["55284-4"]


def test_panel_with_no_usable_component_is_quarantined(tmp_path):
    panel = resource(BP_PANEL)
    for comp in panel["component"]:
        del comp["valueQuantity"]["unit"], comp["valueQuantity"]["code"]
    write_ndjson(tmp_path / "e", "Observation.ndjson", [panel])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert [r["reason"] for r in records] == ["missing_unit"]
    assert summary["dropped_components"] == {}  # a quarantined line's components are not double-counted
    assert len(tables["observations"]) == 0


def test_coded_observation_is_accepted_without_rows(tmp_path):
    coded = resource(OBS, valueQuantity=None, valueCodeableConcept={"text": "negative"})
    write_ndjson(tmp_path / "e", "Observation.ndjson", [coded, resource(OBS, valueQuantity=None, valueString="ok")])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out")
    assert records == [] and len(tables["observations"]) == 0
    assert summary["accepted_without_rows"] == {"Observation": 2}
    assert summary["by_type"]["Observation"]["accepted"] == 2


def test_oversized_json_file_is_refused_unparsed(tmp_path):
    import json

    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": resource(OBS, id=f"o{i}")} for i in range(50)]}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "big.json").write_text(json.dumps(bundle))
    write_ndjson(tmp_path / "e", "Observation.ndjson", [OBS])
    summary, records, tables = extract(tmp_path / "e", tmp_path / "out", max_json_bytes=2048)
    assert [(r["file"], r["line"], r["reason"]) for r in records] == [(label("big.json"), 0, "line_too_long")]
    assert len(tables["observations"]) == 1
    assert_counts_add_up(summary)
