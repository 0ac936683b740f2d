"""What one secure-aggregation round is, and the board its messages go through.

A round sums one vector per site for one (mapping version, measure, period) of one network, in one
stage: ``presence`` (per cell, 0/1 "has patients") or ``value`` (per eligible cell, the fixed-point
figures). Each stage is its own round with fresh per-round keys. A round runs in ``PHASES``, in order;
every site posts at most one message per phase, and a phase's messages are read only after its window
has closed. The protocol (what the messages hold) and the transport (how they reach the other sites)
meet only at ``Board``: opaque bytes per (phase, site).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol

import orjson

#: Bonawitz et al. (CCS 2017), rounds 0-4: advertise keys, share keys, masked input, consistency check
#: (signatures over the contributor set), unmasking (reveal)
PHASES = ("advertise", "shares", "masked", "consistency", "reveal")
STAGES = ("presence", "value")


@dataclass(frozen=True)
class RoundRef:
    network_id: str
    mapping_version: str
    measure: str
    period: str
    stage: str  # "presence" | "value"
    opens: str  # YYYY-MM-DD (UTC): the first day the period can no longer change; fixes the schedule

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"round stage must be one of {STAGES}")

    def label(self) -> bytes:
        """Canonical bytes naming the round: bound into every key derivation and signature of it."""
        return b"qis-fhir/secagg/round/v1\n" + orjson.dumps(
            {
                "network_id": self.network_id,
                "mapping_version": self.mapping_version,
                "measure": self.measure,
                "period": self.period,
                "stage": self.stage,
                "opens": self.opens,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    def tag(self, network_secret: bytes) -> bytes:
        """16 opaque bytes naming the round to DHT nodes: keyed by the network secret, so a node that is
        not a member learns neither the measure nor the period."""
        key = hmac.new(network_secret, b"qis-fhir/secagg/round-tag", hashlib.sha256).digest()
        return hmac.new(key, self.label(), hashlib.sha256).digest()[:16]


class Board(Protocol):
    """Where a round's messages meet. ``LocalBoard`` (tests) keeps them in memory; the DHT board stores
    them as signed, encrypted packets under one DHT key per (round, site)."""

    async def post(self, phase: str, site_id: str, blob: bytes) -> None:
        """Publish this site's one message of ``phase``; a second, different one is refused."""
        ...

    async def collect(self, phase: str) -> dict[str, bytes]:
        """Every site's message of ``phase`` that verifies, by site id (after the phase's window)."""
        ...
