"""Fixtures for the quality tests: the shipped mapping set and good hand-built tables."""

from __future__ import annotations

import pandas as pd
import pytest
from quality_tables import good_tables

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping


@pytest.fixture(scope="session")
def mapping():
    return load_mapping(MAPPINGS_ROOT / "v1")  # the suites these tests break are v1's


@pytest.fixture
def tables(mapping) -> dict[str, pd.DataFrame]:
    return good_tables(mapping)
