"""What outputs may carry: the pipeline's own words, codes, counts, line numbers and FHIR R4B type
and element names. Input text planted where outputs used to copy it (key names, resourceType
strings, file names, an unreadable file's path) must not come out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from extract_helpers import (
    BASE_OBSERVATION,
    BASE_PATIENT,
    CANARY,
    SECRET,
    all_output_bytes,
    assert_counts_add_up,
    extract,
    label,
    resource,
    write_ndjson,
)

from qis_fhir.errors import ExitCode
from qis_fhir.fhir.sources import Labeller

KEY = "Zzyzxcanary_Quillonette"  # a key name, resource type and file name that is a patient's name


@pytest.mark.parametrize("validate", ["full", "sample"])
def test_model_validation_names_only_r4b_elements(tmp_path, validate):
    """line 1 of every file is in the validation sample, so ``sample`` meets it too."""
    bad = resource(BASE_OBSERVATION, **{KEY: 1})
    bad["category"] = [{"coding": [{"system": "http://x", "code": "c", KEY: "v"}]}]
    write_ndjson(tmp_path / "e", "Observation.ndjson", [bad])
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": bad}]}
    (tmp_path / "e" / f"{KEY}.json").write_text(json.dumps(bundle))
    summary, records, _ = extract(tmp_path / "e", tmp_path / "out", validate=validate)
    assert [r["reason"] for r in records] == ["model_validation_failed"] * 2
    for r in records:
        assert r["detail"].startswith("R4B model rejected: ")
        assert sorted(r["detail"].removeprefix("R4B model rejected: ").split("; ")) == [
            "(an element not in the R4B specification) (extra_forbidden)",
            "category.0.coding.0.(an element not in the R4B specification) (extra_forbidden)"]
    assert KEY.encode() not in all_output_bytes(tmp_path / "out")
    assert_counts_add_up(summary)


def test_model_validation_still_names_the_r4b_element_that_failed(tmp_path):
    bad = resource(BASE_OBSERVATION, category=CANARY, valueQuantity=dict(BASE_OBSERVATION["valueQuantity"], unit=7))
    write_ndjson(tmp_path / "e", "Observation.ndjson", [bad])
    _, records, _ = extract(tmp_path / "e", tmp_path / "out", validate="full")
    assert records[0]["detail"].startswith("R4B model rejected: category (list_type); valueQuantity.unit (")


def test_only_r4b_resource_types_are_named_in_skipped_types(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "export.ndjson", [{"resourceType": KEY, "id": "1"}, {"resourceType": "Procedure", "id": "2"},
                                      {"resourceType": "Zzyzx Canary <b>", "id": "3"}])
    (e / "b.json").write_text(json.dumps({"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": KEY}}, {"resource": {"resourceType": "Claim"}}]}))
    summary, records, _ = extract(e, tmp_path / "out")
    assert summary["skipped_types"] == {"Claim": 1, "Procedure": 1, "not_an_r4b_type": 3}
    assert KEY.encode() not in all_output_bytes(tmp_path / "out")
    assert_counts_add_up(summary)


def test_bulk_export_names_are_kept_and_every_other_name_is_a_keyed_hash(tmp_path):
    e = tmp_path / "e"
    bulk = ["1.Observation.ndjson", "Observation_1.ndjson.gz", "Observation-002.ndjson", "Observation.000.ndjson",
            "Patient.ndjson"]
    for name in bulk:
        write_ndjson(e, name, [BASE_PATIENT if name.startswith("Patient") else BASE_OBSERVATION])
    other = [f"{KEY}.ndjson", f"{KEY}.000.ndjson", f"{KEY}_{CANARY}.json"]  # bulk-like, but not an R4B type
    write_ndjson(e, other[0], [BASE_OBSERVATION])
    write_ndjson(e, other[1], [BASE_OBSERVATION])
    (e / other[2]).write_text(json.dumps(BASE_OBSERVATION))
    summary, records, tables = extract(e, tmp_path / "out")
    labels = set(summary["by_file"])
    assert set(bulk) <= labels
    hashed = labels - set(bulk)
    assert len(hashed) == 3 and all(re.fullmatch(r"(nd)?json-file-[0-9a-f]{16}", x) for x in hashed)
    assert set(tables["observations"]["source_file"]) == labels - {"Patient.ndjson"}
    blob = all_output_bytes(tmp_path / "out")
    assert KEY.encode() not in blob and CANARY.encode() not in blob
    # a label is stable for a site and differs between sites
    assert Labeller(SECRET).label(other[2], "json") == label(other[2])
    assert Labeller(b"another-site-secret-of-32-bytes!").label(other[2], "json") != label(other[2])


def _unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run so that a mode-000 file cannot be read: as root, without the capabilities that
    bypass file permissions (util-linux ``setpriv``)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a mode-000 file stays readable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]


def test_an_unreadable_bundle_is_a_counted_file_and_the_run_goes_on(tmp_path):
    e = tmp_path / "e"
    write_ndjson(e, "Observation.ndjson", [BASE_OBSERVATION])
    secret_bundle = e / f"{KEY}_{CANARY}.json"
    secret_bundle.write_text(json.dumps({"resourceType": "Bundle", "entry": []}))
    secret_bundle.chmod(0)
    secret = tmp_path / "site.secret"
    secret.write_text(SECRET.hex() + "\n")
    secret.chmod(0o600)
    out = tmp_path / "out"
    proc = subprocess.run(
        _unprivileged([sys.executable, "-m", "qis_fhir", "-vv", "extract", str(e), "--out", str(out),
                       "--site-secret", str(secret)]),
        capture_output=True, timeout=120,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr.decode(errors="replace")[-3000:]
    summary = json.loads((out / "extract" / "summary.json").read_text())
    name = Labeller(bytes.fromhex(SECRET.hex())).label(secret_bundle.name, "json")
    assert summary["by_file"][name] == {"read": 1, "accepted": 0, "quarantined": 1, "skipped": 0}
    assert summary["quarantine_reasons"] == {"unreadable_file": 1}
    assert summary["rows"]["observations"] == 1
    for text in (proc.stdout, proc.stderr, all_output_bytes(out)):
        assert KEY.encode() not in text and CANARY.encode() not in text
    assert b"Traceback" not in proc.stderr
