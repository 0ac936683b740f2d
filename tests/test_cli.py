"""The command line: every subcommand has --help, and user-fixable errors map to named exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qis_fhir.cli import COMMANDS, cli, main
from qis_fhir.errors import ExitCode


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qis_fhir", *args], capture_output=True, text=True, timeout=120)


def test_every_registered_command_loads_and_has_help():
    from click.testing import CliRunner

    runner = CliRunner()
    for name in COMMANDS:
        command = cli.get_command(None, name)
        assert command is not None, f"qis-fhir {name} is registered but its module does not define it"
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
        sub = getattr(command, "commands", {})
        for sub_name in sub:
            result = runner.invoke(cli, [name, sub_name, "--help"])
            assert result.exit_code == 0, (name, sub_name, result.output)


def test_missing_export_dir_exits_with_input_not_found(tmp_path):
    proc = run_cli("run", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--site-secret", str(tmp_path / "s"))
    assert proc.returncode == ExitCode.INPUT_NOT_FOUND, proc.stderr
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_bootstrap_is_a_usage_error(tmp_path):
    proc = run_cli("run", str(tmp_path), "--out", str(tmp_path / "o"), "--bootstrap", "nohostport")
    assert proc.returncode == ExitCode.USAGE
    assert "HOST:PORT" in proc.stderr


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == ExitCode.USAGE
