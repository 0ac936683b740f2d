"""Shared test helpers: where the read-only Synthea fixtures live.

The fixtures sit beside the checkout (`<repo>/../shared/fixtures`) and are never copied into the
project; tests that need them skip with a reason when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`<repo>/../shared/fixtures`, or skip when the Synthea fixtures are not on this machine."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"Synthea fixtures not found at {FIXTURES_DIR.resolve()} (see README: tests)")
    return FIXTURES_DIR.resolve()
