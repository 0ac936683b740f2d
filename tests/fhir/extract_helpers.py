"""Small builders for extract tests: valid resources, NDJSON files, and one-call extraction."""

from __future__ import annotations

import contextlib
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

# the accepted window (qis_fhir.fhir.dates), written out: from 1850-01-01T00:00:00Z to the clock, which
# tests that need a fixed top edge set to NOW_US (2026-06-30T12:00:00Z) with ``fixed_clock``
FIRST_US = -3_786_825_600_000_000
NOW_US = 1_782_820_800_000_000


@contextlib.contextmanager
def fixed_clock(us: int = NOW_US):
    """Extraction's clock reads ``us`` (microseconds since the epoch) until the block ends; the date
    cache is emptied before and after, so no value checked against another clock is reused."""
    from qis_fhir.fhir import dates

    saved = dates._clock, dates._now_us
    dates._cache.clear()
    dates._clock, dates._now_us = (lambda: us * 1000), dates._LO - 1
    try:
        yield
    finally:
        dates._clock, dates._now_us = saved
        dates._cache.clear()


def fhir_date_strategy():
    """Hypothesis: (text, UTC microseconds since the epoch) for any valid FHIR date or dateTime.

    Years 0001-9999 (around the accepted window's edges, 1850 and NOW_US, drawn often), the partial shapes
    ``YYYY`` and ``YYYY-MM``, leap seconds (``:60``), 1-9 fraction digits (read to the microsecond)
    and offsets -14:00..+14:00, ``Z`` or none (read as UTC). The expected instant comes from numpy's
    datetime64, which spans years 0 and 10000 too, not from the code under test.
    """
    import calendar

    import numpy as np
    from hypothesis import strategies as st

    @st.composite
    def dates(draw):
        year = draw(st.integers(1, 9999) | st.integers(1848, 1851) | st.integers(2025, 2027))
        month = draw(st.integers(1, 12))
        shape = draw(st.sampled_from(["YYYY", "YYYY-MM", "YYYY-MM-DD", "dateTime"]))
        if shape == "YYYY":
            return f"{year:04d}", int(np.datetime64(f"{year:04d}-01-01", "us").astype(np.int64))
        if shape == "YYYY-MM":
            return f"{year:04d}-{month:02d}", int(np.datetime64(f"{year:04d}-{month:02d}-01", "us").astype(np.int64))
        day = draw(st.integers(1, calendar.monthrange(year, month)[1]))
        date = f"{year:04d}-{month:02d}-{day:02d}"
        if shape == "YYYY-MM-DD":
            return date, int(np.datetime64(date, "us").astype(np.int64))
        hh, mm, ss = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 60))
        digits = draw(st.text("0123456789", min_size=1, max_size=9) | st.just(""))
        offset = draw(st.integers(-14 * 60, 14 * 60) | st.sampled_from([-14 * 60, 14 * 60]))
        zone = draw(st.sampled_from(["offset", "Z", ""]))
        text = f"{date}T{hh:02d}:{mm:02d}:{ss:02d}" + (f".{digits}" if digits else "")
        if zone == "offset":
            text += f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
        else:
            text += zone
            offset = 0
        minute = np.datetime64(f"{date}T{hh:02d}:{mm:02d}", "us")
        expected = minute + np.timedelta64(ss, "s") + np.timedelta64(int((digits + "000000")[:6]), "us")
        return text, int((expected - np.timedelta64(offset, "m")).astype(np.int64))

    return dates()


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

BASE_ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}], "text": f"check up {CANARY}"}],
    "subject": {"reference": f"Patient/{CANARY}"},
    "period": {"start": "2020-03-04T09:00:00+01:00", "end": "2020-03-04T09:20:00+01:00"},
    "reasonCode": [{"text": f"worried about {CANARY}"}],
}
