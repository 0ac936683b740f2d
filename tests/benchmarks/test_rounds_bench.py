"""The round benchmark's measurement runs end to end on a small network and checks what it claims."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qis_fhir.bench import rounds
from qis_fhir.dht.cluster import Clock, round_nodes_in_thread
from qis_fhir.secagg.round import SCHEDULE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_small_round_is_measured_and_sums_to_the_central_totals(tmp_path: Path):
    network, identities, node_identities = rounds._network(tmp_path, 5, 4)
    clock = Clock(SCHEDULE.starts(rounds.OPENS))
    with round_nodes_in_thread(network.manifest_path, clock, node_identities, rounds.KSIZE) as addresses:
        r = asyncio.run(rounds._round(network, identities, addresses, clock, "value", 200, seed=3))
    assert r["totals_equal_central_sum"] and r["contributors"] == 5
    assert r["min_replicas"] == rounds.KSIZE  # every chunk of every message on every replica asked
    assert set(r["read_s_by_phase"]) == {"advertise", "shares", "masked", "consistency"}  # the reveal is read by unmask only
    assert r["wire_bytes_by_phase_median"]["masked"] > 8 * 200  # the masked vector itself, sealed
