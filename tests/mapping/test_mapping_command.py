"""`qis-fhir mapping check`: prints what a valid set covers; names file and line of a broken one."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from qis_fhir.errors import MappingError
from qis_fhir.mapping import DEFAULT_MAPPING_DIR, load_mapping
from qis_fhir.mapping.commands import mapping


def test_check_prints_version_hash_and_coverage():
    res = CliRunner().invoke(mapping, ["check", str(DEFAULT_MAPPING_DIR)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"v1 {load_mapping().content_hash}"
    assert "hypertension: measures systolic_bp; treatments TX_0001, TX_0002" in res.output


def test_check_raises_mapping_error_with_line(tmp_path):
    d = shutil.copytree(DEFAULT_MAPPING_DIR, tmp_path / "v1")
    (d / "outcomes.yaml").write_text((d / "outcomes.yaml").read_text().replace("direction: lower", "direction: up", 1))
    res = CliRunner().invoke(mapping, ["check", str(d)])
    assert isinstance(res.exception, MappingError)  # cli.main turns it into exit code 4
    assert str(res.exception).startswith("outcomes.yaml:") and "'up' is not one of lower, higher" in str(res.exception)
