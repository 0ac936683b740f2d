"""The wheel carries the default mapping: an installed (non-editable) qis-fhir finds it without a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_mappings_and_the_installed_package_finds_the_default(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        if os.environ.get("CI") == "true":
            pytest.fail("uv is not on PATH (.ci/run installs it)")
        pytest.skip("uv is not on PATH")
    # --offline: the build backend (hatchling) comes from uv's cache; nothing is fetched
    subprocess.run([uv, "build", "--wheel", "--offline", "--out-dir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("qis_fhir-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n for n in names if n.startswith("qis_fhir/mappings/")}
        expected = {f"qis_fhir/mappings/{p.relative_to(REPO / 'mappings')}" for p in (REPO / "mappings").rglob("*.yaml")}
        assert expected and shipped == expected
        zf.extractall(tmp_path / "site")  # what installing a pure-Python wheel puts in site-packages

    # the installed copy, not the checkout: run from elsewhere with the unpacked wheel first on the path
    probe = ("import qis_fhir, qis_fhir.mapping.loader as l; from qis_fhir.mapping import load_mapping; "
             "m = load_mapping(); print(qis_fhir.__file__); print(l.DEFAULT_MAPPING_DIR); print(m.version)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                         check=True, capture_output=True, text=True, timeout=120).stdout.split()
    assert out == [str(tmp_path / "site" / "qis_fhir" / "__init__.py"), str(tmp_path / "site" / "qis_fhir" / "mappings" / "v2"), "v2"]
