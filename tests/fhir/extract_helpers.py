"""Small builders for extract tests: valid resources, NDJSON files, and one-call extraction."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

from qis_fhir.fhir import extract_export
from qis_fhir.fhir.sources import Labeller

SECRET = b"test-secret-for-extract-tests-32"
CANARY = "CANARY-PID-7f3a"  # a patient id that must never appear in any output

BASE_OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3", "display": "Cholesterol"}]},
    "subject": {"reference": f"Patient/{CANARY}"},
    "effectiveDateTime": "2020-01-02T03:04:05+00:00",
    "issued": "2020-01-02T03:04:05.000+00:00",
    "valueQuantity": {"value": 190.5, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
}

BP_PANEL = {
    "resourceType": "Observation",
    "id": "bp-1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4"}]},
    "subject": {"reference": f"Patient/{CANARY}"},
    "effectiveDateTime": "2020-01-02T03:04:05+00:00",
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {"value": 80, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": 130.0, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        },
    ],
}

BASE_PATIENT = {"resourceType": "Patient", "id": CANARY, "gender": "female", "birthDate": "1950-06"}

BASE_CONDITION = {
    "resourceType": "Condition",
    "id": "cond-1",
    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"},
                        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]},
    "subject": {"reference": f"Patient/{CANARY}"},
    "onsetDateTime": "2019-05-01",
}

BASE_REQUEST = {
    "resourceType": "MedicationRequest",
    "id": "req-1",
    "status": "active",
    "intent": "order",
    "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "316049"}]},
    "subject": {"reference": f"Patient/{CANARY}"},
    "authoredOn": "2019-05-02T10:00:00Z",
    "reasonReference": [{"reference": "Condition/cond-1"}],
}


def label(name: str) -> str:
    """How the outputs of ``extract`` name the export file ``name``."""
    return Labeller(SECRET).label(name, "json" if name.endswith((".json", ".json.gz")) else "ndjson")


def resource(base: dict, **changes) -> dict:
    """A deep copy of ``base`` with top-level fields replaced (``None`` deletes a field)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def line(obj: dict | bytes) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def write_ndjson(directory: Path, name: str, items: list[dict | bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    data = b"".join(line(i) + b"\n" for i in items)
    if name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def extract(export: Path, out: Path, **kwargs):
    """Run extraction; return (summary dict, quarantine records, tables)."""
    from qis_fhir.fhir import load_extract

    kwargs.setdefault("validate", "off")
    summary = extract_export(export, out, secret=SECRET, **kwargs)
    records = [json.loads(x) for x in (out / "quarantine.ndjson").read_text().splitlines()]
    return summary.to_dict(), records, load_extract(out)


def all_output_bytes(out: Path) -> bytes:
    """Every output file, Parquet decoded to CSV (compressed bytes would hide a leaked string)."""
    import pandas as pd

    blobs = []
    for path in sorted(out.rglob("*")):
        if path.suffix == ".parquet":
            blobs.append(pd.read_parquet(path).to_csv(index=False).encode())
        elif path.is_file():
            blobs.append(path.read_bytes())
    return b"\n".join(blobs)


def assert_counts_add_up(summary: dict) -> None:
    for name, c in summary["by_type"].items():
        assert c["read"] == c["accepted"] + c["quarantined"], name
    for name, c in summary["by_file"].items():
        assert c["read"] == c["accepted"] + c["quarantined"] + c["skipped"], name
    t = summary["totals"]
    assert t["read"] == t["accepted"] + t["quarantined"] + t["skipped"]
    assert t["read"] == sum(c["read"] for c in summary["by_file"].values())
    assert t["quarantined"] == sum(summary["quarantine_reasons"].values())


_CHILD = """
import json, resource, sys
from qis_fhir.fhir import extract_export
a = json.loads(sys.argv[1])
s = extract_export(a["export"], a["out"], secret=bytes.fromhex(a["secret"]), **a["kwargs"])
print(json.dumps({"summary": s.to_dict(), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def extract_in_child(export: Path, out: Path, **kwargs) -> tuple[dict, float]:
    """Extract in a fresh Python process: (summary dict, that process's peak RSS in MiB)."""
    import subprocess
    import sys

    kwargs.setdefault("validate", "off")
    arg = json.dumps({"export": str(export), "out": str(out), "secret": SECRET.hex(), "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return result["summary"], result["peak_mib"]


def peak_mib_without_the_bomb(tmp: Path, name: str, data: bytes, **kwargs) -> float:
    """Peak RSS of a child extracting ``data`` as the file ``name``: the bomb's file without the bomb,
    so the difference is what the bomb's size adds."""
    export = tmp / "small-export"
    export.mkdir()
    (export / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return extract_in_child(export, tmp / "small-out", **kwargs)[1]
