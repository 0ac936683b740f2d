"""`qis-fhir mapping check`: prints what a valid set covers; names file and line of a broken one."""

from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from qis_fhir.errors import ExitCode, MappingError
from qis_fhir.mapping import DEFAULT_MAPPING_DIR, MAPPINGS_ROOT, load_mapping
from qis_fhir.mapping.commands import mapping


def test_check_prints_version_hash_and_coverage():
    res = CliRunner().invoke(mapping, ["check", str(DEFAULT_MAPPING_DIR)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"v2 {load_mapping().content_hash}"
    assert "hypertension: measures systolic_bp; treatments TX_0001, TX_0002" in res.output
    assert re.fullmatch(r"quality.yaml: \d+ rules on 7 tables, 5 plausibility ranges that warn .*", res.output.splitlines()[-1])


def test_check_raises_mapping_error_with_line(tmp_path):
    d = shutil.copytree(MAPPINGS_ROOT / "v1", tmp_path / "v1")
    (d / "outcomes.yaml").write_text((d / "outcomes.yaml").read_text().replace("direction: lower", "direction: up", 1))
    res = CliRunner().invoke(mapping, ["check", str(d)])
    assert isinstance(res.exception, MappingError)  # cli.main turns it into exit code 4
    assert str(res.exception).startswith("outcomes.yaml:") and "'up' is not one of lower, higher" in str(res.exception)


def test_check_refuses_mostly_on_a_structural_rule_of_quality_yaml_with_exit_code_4(tmp_path, capsys):
    """A unit rule that tolerated 1 % wrong units would let mmol/L values through as mg/dL."""
    from qis_fhir.cli import main

    d = shutil.copytree(MAPPINGS_ROOT / "v1", tmp_path / "v1")
    text = (d / "quality.yaml").read_text()
    old = '- in_set: {column: unit, values: ["%"], where: {code: "4548-4"}}'
    line = text[: text.index(old)].count("\n") + 1
    (d / "quality.yaml").write_text(text.replace(old, old[:-1] + ", mostly: 0.99}"))
    with pytest.raises(SystemExit) as exc:
        main(["mapping", "check", str(d)])
    assert exc.value.code == ExitCode.MAPPING_INVALID
    assert capsys.readouterr().err.startswith(f"error: quality.yaml:{line}: in_set takes no 'mostly'")
