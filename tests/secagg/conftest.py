"""Rosters of in-memory sites for the secure-aggregation tests."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.packets.keys import raw_public

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dht"))  # dht_cluster.make_network: a real network
from qis_fhir.secagg import RoundRef
from qis_fhir.secagg.local import LocalBoard, run_round
from qis_fhir.secagg.protocol import Roster, SiteRound


def make_ref(stage: str = "presence", measure: str = "sbp", period: str = "2024") -> RoundRef:
    return RoundRef("net-test", "1.0.0", measure, period, stage, "2025-04-01")


class Sites:
    """``n`` sites with Ed25519 keys and a roster of them (m = ``min_sites``)."""

    def __init__(self, n: int, min_sites: int = 3) -> None:
        self.ids = [f"site-{i:02d}" for i in range(n)]
        self.keys = {s: Ed25519PrivateKey.generate() for s in self.ids}
        self.roster = Roster({s: (raw_public(k.public_key()),) for s, k in self.keys.items()}, min_sites)

    def rounds(self, ref: RoundRef, vectors: dict[str, np.ndarray], **kwargs) -> list[SiteRound]:
        return [SiteRound(ref, s, self.keys[s], self.roster, vectors[s], **kwargs) for s in self.ids if s in vectors]

    def run(self, ref: RoundRef, vectors: dict[str, np.ndarray], board=None, **kwargs):
        board = board if board is not None else LocalBoard()
        stop = kwargs.pop("stop_before", None)
        return asyncio.run(run_round(self.rounds(ref, vectors, **kwargs), board, stop_before=stop)), board


@pytest.fixture
def sites():
    return Sites
