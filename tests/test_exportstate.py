"""What an export folder holds and whether it is finished, before anything reads it: one rule for the
new-export sensor and the export's observation in Dagster."""

from __future__ import annotations

import json
import os
import time

from qis_fhir.exportstate import COMPLETE, EMPTY, MISSING, WRITING, inspect_export

HOUR_AGO = time.time() - 3600


def _file(folder, name, text, when=HOUR_AGO):
    path = folder / name
    path.write_text(text)
    os.utime(path, (when, when))
    return path


def test_files_and_bytes_by_resource_type_and_nothing_named(tmp_path):
    _file(tmp_path, "Observation.000.ndjson", "{}\n" * 10)
    _file(tmp_path, "Observation.001.ndjson", "{}\n" * 5)
    _file(tmp_path, "Patient.ndjson", "{}\n")
    _file(tmp_path, "smith-john.json", '{"resourceType": "Bundle"}')  # a name a patient could be read from
    _file(tmp_path, ".hidden", "x")
    (tmp_path / "sub").mkdir()
    state = inspect_export(tmp_path)
    assert state.completion == COMPLETE and state.complete
    assert state.files == 4 and state.bytes == 30 + 15 + 3 + 26
    assert state.files_by_type == {"Observation": 2, "Patient": 1, "other": 1}
    assert state.bytes_by_type == {"Observation": 45, "Patient": 3, "other": 26}
    assert "smith" not in json.dumps(state.__dict__)
    assert not state.bulk_manifest


def test_completion_missing_empty_being_written_then_complete(tmp_path):
    assert inspect_export(tmp_path / "nope").completion == MISSING
    folder = tmp_path / "2026-11-27"
    folder.mkdir()
    assert inspect_export(folder).completion == EMPTY
    now = time.time()
    _file(folder, "Patient.ndjson", "{}\n", when=now)
    assert inspect_export(folder, now=now).completion == WRITING  # a file changed within the quiet time
    assert inspect_export(folder, now=now + 301).completion == COMPLETE


def test_the_data_version_changes_with_any_file_and_the_manifest_is_recognised(tmp_path):
    _file(tmp_path, "Patient.ndjson", "{}\n")
    before = inspect_export(tmp_path).version
    assert inspect_export(tmp_path).version == before  # the same files: the same version
    _file(tmp_path, "Patient.ndjson", "{}\n{}\n")  # re-delivered with another line
    assert inspect_export(tmp_path).version != before
    _file(tmp_path, "manifest.json", json.dumps({"transactionTime": "2026-11-27T02:00:00Z", "output": [], "request": "x"}))
    assert inspect_export(tmp_path).bulk_manifest
    _file(tmp_path, "manifest.json", json.dumps({"resourceType": "Bundle", "output": [], "transactionTime": "x"}))
    assert not inspect_export(tmp_path).bulk_manifest  # a resource is not a manifest
