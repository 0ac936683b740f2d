"""Shared test helpers: where the read-only Synthea fixtures live.

The fixtures sit beside the checkout (`<repo>/../shared/fixtures`) and are never copied into the
project; tests that need them skip with a reason when the folder is absent.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def require():
    """``require(ok, reason)``: skip the test when ``ok`` is false (root, a binary, a kernel feature
    missing here), except under CI (env ``CI=true``), where the machine is set up to run it and a
    skip would hide a test that never ran: there it fails instead."""

    def check(ok: bool, reason: str) -> None:
        if ok:
            return
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason} (CI=true: this test must run here; see .ci/run)")
        pytest.skip(reason)

    return check
