"""Privacy canary: a patient with a unique id, name, birth date and free-text strings runs through the
whole pipeline (`qis-fhir -vv run EXPORT --site --network --out`); none of those strings, nor the raw
patient id, may appear in the packets, the logs, the disclosure report or any other file the run
writes. The canary's episode must land in a *published* packet, or the test would prove nothing.

Input text also sits where extraction used to copy it into its outputs: a key name (model validation
named it), a ``resourceType`` (``skipped_types`` listed it), and file names (a Bundle file named after
the patient, as Synthea names them, and an NDJSON file named like a bulk file of a type R4B lacks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pandas as pd
import pytest

from qis_fhir.packets.codec import decode_packet
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import add_site, create_network, load_network
from qis_fhir.privacy.fingerprint import Fingerprinter
from qis_fhir.privacy.pseudonym import Pseudonymizer

CANARY_ID = "canary-7f3e9c1a-5b2d-4e8f-9a01-3c5d7e9f1b2a"
CANARY = {
    "id": CANARY_ID,
    "family": "Zzyzxcanary",
    "given": "Quillonette",
    "birth": "1968-02-29",
    "mrn": "MRN-CANARY-004217",
    "phone": "555-0199-2841",
    "street": "42 Canaryfeather Lane",
    "narrative": "CANARY-NARRATIVE-patient-said-she-fears-needles",
    "condition_note": "CANARY-FREETEXT-condition-diagnosed-at-street-fair",
    "condition_text": "CANARY-FREETEXT-high-blood-pressure-per-daughter",
    "dosage": "CANARY-FREETEXT-take-with-grapefruit-juice",
    "med_note": "CANARY-FREETEXT-pharmacist-called-twice",
    "obs_note": "CANARY-FREETEXT-cuff-too-small-left-arm",
    "key_name": "Zzyzxcanarykeyname",
    "resource_type": "ZzyzxcanaryResourceType",
    "file_name": "Zzyzxcanaryfile",
}
PATIENTS = 14  # >= 11: the cohort is published


def _patient(i: int) -> tuple[str, dict]:
    canary = i == 0
    pid = CANARY_ID if canary else f"pt-{i:04d}"
    birth = CANARY["birth"] if canary else f"{1960 + i}-0{1 + i % 9}-1{i % 10}"
    res = {
        "resourceType": "Patient",
        "id": pid,
        "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{CANARY['narrative'] if canary else 'Patient ' + str(i)}</div>"},
        "identifier": [{"system": "http://hospital.example/mrn", "value": CANARY["mrn"] if canary else f"MRN-{i:06d}"}],
        "name": [{"use": "official", "family": CANARY["family"] if canary else f"Family{i}", "given": [CANARY["given"] if canary else f"Given{i}"]}],
        "telecom": [{"system": "phone", "value": CANARY["phone"] if canary else f"555-01{i:02d}"}],
        "gender": "female",
        "birthDate": birth,
        "address": [{"line": [CANARY["street"] if canary else f"{i} Main St"], "city": "Springfield", "postalCode": "01103"}],
    }
    return pid, res


def _write_export(export: Path) -> None:
    export.mkdir(parents=True)
    lines: dict[str, list[dict]] = {"Patient": [], "Condition": [], "MedicationRequest": [], "Observation": []}
    for i in range(PATIENTS):
        pid, patient = _patient(i)
        canary = i == 0
        ref = {"reference": f"Patient/{pid}"}
        lines["Patient"].append(patient)
        cond = {
            "resourceType": "Condition",
            "id": f"cond-{pid}",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}],
                     "text": CANARY["condition_text"] if canary else "Hypertension"},
            "subject": ref,
            # over a year before the treatment: a new user under the default mapping's washout
            "onsetDateTime": "2022-06-01T10:00:00Z",
            "note": [{"text": CANARY["condition_note"] if canary else "routine"}],
        }
        lines["Condition"].append(cond)
        lines["MedicationRequest"].append({
            "resourceType": "MedicationRequest",
            "id": f"med-{pid}",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "316049", "display": "Hydrochlorothiazide 25 MG"}],
                                          "text": "HCTZ"},
            "subject": ref,
            "authoredOn": "2024-02-01T09:00:00Z",
            "reasonReference": [{"reference": f"Condition/cond-{pid}"}],
            "dosageInstruction": [{"text": CANARY["dosage"] if canary else "once daily"}],
            "note": [{"text": CANARY["med_note"] if canary else "none"}],
        })
        for day, systolic in (("2024-01-20", 152.0 + i), ("2024-04-02", 138.0 + (i % 5))):
            lines["Observation"].append({
                "resourceType": "Observation",
                "id": f"obs-{pid}-{day}",
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4", "display": "Blood pressure systolic and diastolic"}]},
                "subject": ref,
                "effectiveDateTime": f"{day}T08:30:00Z",
                "note": [{"text": CANARY["obs_note"] if canary else "ok"}],
                "component": [
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                     "valueQuantity": {"value": systolic, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                     "valueQuantity": {"value": 85.0, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                ],
            })
    for rtype, resources in lines.items():
        (export / f"{rtype}.000.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    # input text where outputs used to copy it: a key name (quarantined by --validate full, so the
    # canary's own episode is untouched), a resourceType, and the file names
    extra_key = dict(lines["Observation"][0], id="obs-extra", **{CANARY["key_name"]: CANARY["obs_note"]})
    other_type = {"resourceType": CANARY["resource_type"], "id": CANARY_ID, "note": CANARY["narrative"]}
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{CANARY_ID}-x", "resource": extra_key}, {"resource": other_type}]}
    (export / f"{CANARY['family']}_{CANARY['given']}_{CANARY_ID}.json").write_bytes(orjson.dumps(bundle))
    (export / f"{CANARY['file_name'].capitalize()}.000.ndjson").write_bytes(
        orjson.dumps(other_type) + b"\n" + orjson.dumps(extra_key) + b"\n")


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    pytest.importorskip("qis_fhir.pipeline")
    root = tmp_path_factory.mktemp("canary")
    _write_export(root / "export")
    create_network(root / "net", network_id="canary-net")
    create_site("site-canary", root / "site")
    add_site(root / "net", root / "site")
    env = {**os.environ, "QIS_FHIR_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "dagster")}
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "-vv", "run", str(root / "export"), "--site", str(root / "site"),
         "--network", str(root / "net" / "manifest.json"), "--out", str(root / "out"), "--validate", "full"],
        capture_output=True, env=env, timeout=300,
    )
    return root, proc


def _needles() -> dict[str, bytes]:
    return {k: v.encode() for k, v in CANARY.items()}


def test_canary_reaches_a_published_packet(canary_run):
    root, proc = canary_run
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    from qis_fhir.privacy.secrets import read_secret

    key = Pseudonymizer(read_secret(root / "site" / "site.secret")).key(f"Patient/{CANARY_ID}")
    events = pd.read_parquet(root / "out" / "outcome_events.parquet")
    mine = events[events.patient_key == key]
    assert len(mine) == 1, "the canary patient produced no outcome event: the test would prove nothing"
    row = mine.iloc[0]
    fp = Fingerprinter(load_network(root / "net").secret, row.mapping_version)(row.bucket, row.age_band, row.sex)
    packets = [decode_packet(line) for line in (root / "out" / "packets.ndjson").read_bytes().splitlines() if line]
    assert any(p.fingerprint == fp and p.treatment == row.treatment_code and p.patients == PATIENTS for p in packets)


def test_no_canary_string_leaves_the_site(canary_run):
    root, proc = canary_run
    assert proc.returncode == 0
    outgoing = {
        "packets.ndjson": (root / "out" / "packets.ndjson").read_bytes(),
        "disclosure_report.json": (root / "out" / "disclosure_report.json").read_bytes(),
        "stdout": proc.stdout,
        "stderr (-vv log)": proc.stderr,
    }
    assert len(proc.stderr) > 0, "expected -vv log output to check"
    for name, data in outgoing.items():
        for what, needle in _needles().items():
            assert needle not in data, f"canary {what} found in {name}"
            assert needle.lower() not in data.lower(), f"canary {what} (any case) found in {name}"


def test_no_identifying_canary_string_in_any_output_file(canary_run):
    """Stricter: the raw id, name, contact details, free text, key names, resource types and file
    names reach no file the run wrote at all, Parquet tables read back as values as well as their
    compressed bytes (tables hold pseudonymous keys; birth dates are typed timestamps, never strings)."""
    root, proc = canary_run
    assert proc.returncode == 0
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for path in files:
        blobs = [(path.read_bytes(), _needles())]
        if path.suffix == ".parquet":  # read back, the birth date is the patients table's typed value
            values = {k: v for k, v in _needles().items() if k != "birth"}
            blobs.append((pd.read_parquet(path).to_csv(index=False).encode(), values))
        for data, needles in blobs:
            for what, needle in needles.items():
                assert needle.lower() not in data.lower(), f"canary {what} found in {path.relative_to(root)}"


def test_the_planted_input_was_read_and_counted(canary_run):
    """The planted files were read, not skipped: the key name was quarantined by model validation,
    the resource type counted as not an R4B type, both files named by keyed labels."""
    root, proc = canary_run
    summary = orjson.loads((root / "out" / "extract" / "summary.json").read_bytes())
    assert summary["quarantine_reasons"].get("model_validation_failed") == 2
    assert summary["skipped_types"].get("not_an_r4b_type") == 2
    assert sum(name.startswith(("json-file-", "ndjson-file-")) for name in summary["by_file"]) == 2
