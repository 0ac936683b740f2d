"""Fixtures for the DHT tests: one real network (governance key, manifest, five sites) per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dht_cluster import BASE_SITES, TestNetwork, make_network  # noqa: E402


@pytest.fixture(scope="session")
def dht_network(tmp_path_factory: pytest.TempPathFactory) -> TestNetwork:
    """A network made with the packets stage's own APIs (network new, keys new, add-site)."""
    return make_network(tmp_path_factory.mktemp("dht-net"), BASE_SITES)
