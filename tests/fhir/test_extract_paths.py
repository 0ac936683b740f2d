"""Every path of the export folder is read or counted with a reason; nothing outside it is read."""

from __future__ import annotations

import os
import threading

from extract_helpers import BASE_OBSERVATION, BASE_PATIENT, assert_counts_add_up, extract, write_ndjson


def test_symlink_out_of_the_export_folder_is_refused_and_counted(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Patient.ndjson", [BASE_PATIENT])
    os.symlink("/proc/self/environ", e / "Observation.ndjson")
    outside = write_ndjson(tmp_path / "elsewhere", "Condition.ndjson", [b"{not read"])
    os.symlink(outside, e / "Condition.ndjson")
    os.symlink("../elsewhere/Condition.ndjson", e / "MedicationRequest.ndjson")  # relative, still outside
    summary, records, tables = extract(e, tmp_path / "out")
    assert summary["skipped_paths"] == {"symlink_outside_export": 3}
    assert list(summary["by_file"]) == ["Patient.ndjson"]
    assert records == [] and len(tables["patients"]) == 1
    assert_counts_add_up(summary)


def test_symlink_to_a_file_inside_the_folder_is_read_under_its_own_name(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e / "parts", "obs.ndjson", [BASE_OBSERVATION])
    os.symlink("parts/obs.ndjson", e / "Observation.ndjson")
    summary, records, tables = extract(e, tmp_path / "out")
    assert summary["by_file"] == {"Observation.ndjson": {"read": 1, "accepted": 1, "quarantined": 0, "skipped": 0}}
    assert summary["skipped_paths"] == {"directory": 1}  # parts/ itself is not walked
    assert len(tables["observations"]) == 1


def test_every_path_that_is_not_read_is_counted_with_its_reason(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Observation.ndjson", [BASE_OBSERVATION])
    (e / "Observation.000.ndjson").mkdir()  # a directory named like a part file
    (e / "Bundle.json").mkdir()
    os.symlink(e / "missing.ndjson", e / "Patient.ndjson")  # dangling
    os.mkfifo(e / "Condition.ndjson")  # opening it for reading would wait for a writer forever
    (e / ".DS_Store").write_bytes(b"\0")
    (e / "LICENSE").write_text("Apache-2.0")
    done = threading.Event()
    result = {}

    def run():
        result["out"] = extract(e, tmp_path / "out")
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    if not done.wait(60):  # a FIFO that was opened would block here
        with open(e / "Condition.ndjson", "wb"):  # release the reader so the thread can end
            pass
        raise AssertionError("extraction blocked on a FIFO")
    summary, records, tables = result["out"]
    assert summary["skipped_paths"] == {"broken_symlink": 1, "directory": 2, "hidden_file": 1,
                                        "not_a_regular_file": 1, "not_fhir_data": 1}
    assert list(summary["by_file"]) == ["Observation.ndjson"]
    assert len(tables["observations"]) == 1
    assert_counts_add_up(summary)
