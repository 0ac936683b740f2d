"""Fixtures for the synth tests."""

from __future__ import annotations

import pytest

from qis_fhir.synth import SynthResult, generate_export


@pytest.fixture(scope="session")
def medium_export(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """3,000 patients: enough for every planted cohort to be visible; about a second to write."""
    out = tmp_path_factory.mktemp("synth") / "site"
    return generate_export(out, patients=3000, seed=20240611, max_lines_per_file=20_000)
