"""`qis-fhir run` on a small real export with valid FHIR dates at the edges of FHIR's range.

``9999-12-31T23:59:59-12:00`` (year 10000 in UTC) once killed the quality stage with a
NotImplementedError, losing the whole night for one line, and ``0001-01-01T00:00:00+14:00`` was
stored as year 0. Now both lines are quarantined as ``date_out_of_range`` and the run succeeds, as it
does with a date in the future (which the quality suites used to refuse for the whole run); dates at
the edges of the accepted window (1850-01-01 UTC to the time of extraction) go through every stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from itertools import islice
from pathlib import Path

import pandas as pd

from qis_fhir.errors import ExitCode

PATIENTS = 12
FLOOR = "1850-01-01T14:00:00+14:00"  # 1850-01-01T00:00:00Z, the first instant accepted
FUTURE = "is in the future (later than the time of extraction)"
_EFFECTIVE = re.compile(rb'"effectiveDateTime":"[^"]*"')


def small_export(fixtures_dir: Path) -> dict[str, list[bytes]]:
    """The first PATIENTS patients of synthea-r4-105 and every line naming one of them, by file
    (their Encounters too)."""
    src = fixtures_dir / "synthea-r4-105"
    patients = list(islice((src / "Patient.000.ndjson").open("rb"), PATIENTS))
    refs = [b'"Patient/' + json.loads(p)["id"].encode() + b'"' for p in patients]
    files = {"Patient.000.ndjson": patients}
    for path in sorted(src.glob("*.ndjson")):
        if path.name != "Patient.000.ndjson":
            files[path.name] = [line for line in path.open("rb") if any(r in line for r in refs)]
    return files


def dated(line: bytes, text: str) -> bytes:
    """A real Observation line with its effectiveDateTime replaced, every other byte kept."""
    out, n = _EFFECTIVE.subn(b'"effectiveDateTime":"' + text.encode() + b'"', line)
    assert n == 1
    return out


def write(files: dict[str, list[bytes]], export: Path) -> int:
    export.mkdir(parents=True)
    for name, lines in files.items():
        (export / name).write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
    return sum(len(lines) for lines in files.values())


def test_valid_fhir_dates_beyond_the_window_are_quarantined_and_the_night_runs(fixtures_dir, tmp_path):
    files = small_export(fixtures_dir)
    obs = files["Observation.000.ndjson"]
    template = next(line for line in obs if b'"valueQuantity"' in line and _EFFECTIVE.search(line))
    obs += [dated(template, "9999-12-31T23:59:59-12:00"), dated(template, "0001-01-01T00:00:00+14:00")]
    late, early = len(obs) - 1, len(obs)
    lines = write(files, tmp_path / "export")
    out = tmp_path / "out"

    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "run", str(tmp_path / "export"), "--out", str(out),
         "--site-secret", str(tmp_path / "site.secret")],
        capture_output=True, text=True, timeout=600,
    )

    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    summary = json.loads((out / "extract" / "summary.json").read_text())
    totals = summary["totals"]
    assert totals["read"] == lines == totals["accepted"] + totals["quarantined"] + totals["skipped"]
    assert summary["by_type"]["Encounter"]["accepted"] == len(files["Encounter.000.ndjson"]) > 0
    assert summary["by_file"]["Observation.000.ndjson"]["read"] == len(obs)
    assert summary["quarantine_reasons"]["date_out_of_range"] == 2
    records = [json.loads(r) for r in (out / "quarantine.ndjson").read_text().splitlines()]
    dates = [(r["file"], r["line"], r["resource_type"], r["detail"]) for r in records if r["reason"] == "date_out_of_range"]
    assert dates == [("Observation.000.ndjson", late, "Observation", f"effective {FUTURE}"),
                     ("Observation.000.ndjson", early, "Observation", "effective is before 1850-01-01 UTC")]
    rows = pd.read_parquet(out / "extract" / "observations.parquet")
    assert not rows["source_line"].isin([late, early]).any()
    assert json.loads((out / "quality" / "extract.json").read_text())["success"] is True


def _set_date(line: bytes, field: str, text: str) -> bytes:
    out, n = re.subn(b'"' + field.encode() + b'":"[^"]*"', b'"' + field.encode() + b'":"' + text.encode() + b'"', line)
    assert n == 1
    return out


def test_dates_at_the_edges_of_the_window_pass_every_stage_to_the_packets(fixtures_dir, tmp_path):
    """The oldest accepted birthDate, onset, prescription and observation, and an observation of a
    minute ago written at +14:00: outcomes, quality (not_in_future included) and packets take them."""
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.pipeline import RunConfig, run_pipeline

    files = small_export(fixtures_dir)
    files["Patient.000.ndjson"][0] = _set_date(files["Patient.000.ndjson"][0], "birthDate", "1850")
    files["Condition.000.ndjson"][0] = _set_date(files["Condition.000.ndjson"][0], "onsetDateTime", FLOOR)
    files["MedicationRequest.000.ndjson"][0] = _set_date(files["MedicationRequest.000.ndjson"][0], "authoredOn", FLOOR)
    obs = files["Observation.000.ndjson"]
    obs[0] = dated(obs[0], FLOOR)
    recent = (datetime.now(timezone(timedelta(hours=14))) - timedelta(minutes=1)).replace(microsecond=0)
    obs[1] = dated(obs[1], recent.isoformat(timespec="seconds"))
    write(files, tmp_path / "export")
    create_network(tmp_path / "net", network_id="ours", min_cell_size=11)
    create_site("st-mary", tmp_path / "site")
    add_site(tmp_path / "net", tmp_path / "site")

    result = run_pipeline(RunConfig(export_dir=tmp_path / "export", out_dir=tmp_path / "out",
                                    site_dir=tmp_path / "site", network_dir=tmp_path / "net"))

    assert "date_out_of_range" not in result.extract["quarantine_reasons"]
    assert result.quality["success"] is True and result.packets is not None
    tables = {n: pd.read_parquet(tmp_path / "out" / "extract" / f"{n}.parquet")
              for n in ("patients", "conditions", "medication_requests", "observations")}
    floor = pd.Timestamp("1850-01-01", tz="UTC")
    assert tables["patients"]["birth_date"].min() == floor
    assert tables["conditions"]["onset"].min() == floor
    assert tables["medication_requests"]["authored_on"].min() == floor
    effective = tables["observations"]["effective"]
    assert effective.min() == floor and effective.max() == pd.Timestamp(recent).tz_convert("UTC")


def test_a_date_in_the_future_costs_its_line_not_the_night(fixtures_dir, tmp_path):
    """A future date in any table (a typo, a clock or time-zone fault at the source) is quarantined;
    the quality suites, whose not_in_future refuses a whole table for one row, then pass."""
    from qis_fhir.pipeline import RunConfig, run_pipeline

    files = small_export(fixtures_dir)
    next_year = str(datetime.now(UTC).year + 1)
    tomorrow = (datetime.now(timezone(timedelta(hours=-14))) + timedelta(days=1)).isoformat(timespec="seconds")
    files["Patient.000.ndjson"][0] = _set_date(files["Patient.000.ndjson"][0], "birthDate", next_year)
    files["Condition.000.ndjson"][0] = _set_date(files["Condition.000.ndjson"][0], "onsetDateTime", tomorrow)
    files["MedicationRequest.000.ndjson"][0] = _set_date(files["MedicationRequest.000.ndjson"][0], "authoredOn",
                                                         "2199-12-31T09:59:59.999999-14:00")
    files["Observation.000.ndjson"][0] = dated(files["Observation.000.ndjson"][0], tomorrow)
    write(files, tmp_path / "export")

    result = run_pipeline(RunConfig(export_dir=tmp_path / "export", out_dir=tmp_path / "out",
                                    site_secret_path=tmp_path / "site.secret"))

    assert result.quality["success"] is True
    records = [json.loads(r) for r in (tmp_path / "out" / "quarantine.ndjson").read_text().splitlines()]
    assert sorted((r["file"], r["line"], r["detail"]) for r in records if r["reason"] == "date_out_of_range") == [
        ("Condition.000.ndjson", 1, f"onset {FUTURE}"),
        ("MedicationRequest.000.ndjson", 1, f"authoredOn {FUTURE}"),
        ("Observation.000.ndjson", 1, f"effective {FUTURE}"),
        ("Patient.000.ndjson", 1, f"birthDate {FUTURE}"),
    ]
    totals = result.extract["totals"]
    assert totals["read"] == totals["accepted"] + totals["quarantined"] + totals["skipped"]
