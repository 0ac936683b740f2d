"""`qis-fhir extract`: outputs, the printed summary, the site secret file, and exit codes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from extract_helpers import BASE_OBSERVATION, CANARY, write_ndjson

from qis_fhir.cli import main
from qis_fhir.errors import ExitCode


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_extract_writes_outputs_prints_counts_and_creates_a_0600_secret(tmp_path, capsys):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION, b"{broken"])
    (tmp_path / "e" / "LICENSE").write_text("Apache-2.0")
    secret = tmp_path / "keys" / "site.secret"
    code, out, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / "out"), "--site-secret", str(secret)], capsys)
    assert code == ExitCode.OK, err
    assert "read 2" in out and "accepted 1" in out and "quarantined 1" in out and "invalid_json 1" in out
    assert "paths not read: not_fhir_data 1" in out and "limits reached" not in out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "out" / "extract" / "observations.parquet").is_file()
    summary = json.loads((tmp_path / "out" / "extract" / "summary.json").read_text())
    assert summary["totals"] == {"read": 2, "accepted": 1, "quarantined": 1, "skipped": 0}
    assert CANARY not in out + err


def test_same_secret_gives_same_keys_across_runs(tmp_path, capsys):
    import pandas as pd

    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION])
    secret = tmp_path / "site.secret"
    for out in ("a", "b"):
        code, _, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / out), "--site-secret", str(secret)], capsys)
        assert code == ExitCode.OK, err
    a, b = (pd.read_parquet(tmp_path / o / "extract" / "observations.parquet") for o in ("a", "b"))
    assert list(a["patient_key"]) == list(b["patient_key"])


def test_default_secret_lives_in_qis_fhir_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QIS_FHIR_HOME", str(tmp_path / "home"))
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION])
    code, _, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / "out")], capsys)
    assert code == ExitCode.OK, err
    assert stat.S_IMODE((tmp_path / "home" / "site.secret").stat().st_mode) == 0o600


def test_group_readable_secret_is_refused(tmp_path, capsys):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION])
    secret = tmp_path / "site.secret"
    secret.write_text("00" * 32 + "\n")
    secret.chmod(0o644)
    code, _, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / "out"), "--site-secret", str(secret)], capsys)
    assert code == ExitCode.SECRET_INVALID
    assert not (tmp_path / "out").exists()


def test_a_limit_reached_is_said_on_the_console(tmp_path, capsys):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION] + [b"{bad"] * 1001)
    code, out, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / "out"),
                              "--site-secret", str(tmp_path / "s")], capsys)
    assert code == ExitCode.OK, err
    assert "limits reached in 1 file(s): see caps_hit in summary.json" in out
    assert len((tmp_path / "out" / "quarantine.ndjson").read_text().splitlines()) == 1000


def test_nothing_accepted_exits_nothing_extracted_but_keeps_the_quarantine(tmp_path, capsys):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [b"{bad", b"[1]"])
    code, out, err = run_cli(["extract", str(tmp_path / "e"), "--out", str(tmp_path / "out"),
                              "--site-secret", str(tmp_path / "s")], capsys)
    assert code == ExitCode.NOTHING_EXTRACTED
    # a failed extraction never replaces a complete one: its files stay in the staging folder
    assert len((tmp_path / "out.partial" / "quarantine.ndjson").read_text().splitlines()) == 2


def test_missing_export_dir_exits_input_not_found(tmp_path, capsys):
    code, _, err = run_cli(["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "out"),
                            "--site-secret", str(tmp_path / "s")], capsys)
    assert code == ExitCode.INPUT_NOT_FOUND
    assert "does not exist" in err


def test_bad_validate_mode_is_a_usage_error(tmp_path, capsys):
    code, _, _ = run_cli(["extract", str(tmp_path), "--out", str(tmp_path / "o"), "--validate", "most"], capsys)
    assert code == ExitCode.USAGE


def test_console_script_runs_as_a_module(tmp_path):
    write_ndjson(tmp_path / "e", "Observation.ndjson", [BASE_OBSERVATION])
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "extract", str(tmp_path / "e"), "--out", str(tmp_path / "out"),
         "--site-secret", str(tmp_path / "s"), "--validate", "full"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model-validated: 1 (full)" in proc.stdout
