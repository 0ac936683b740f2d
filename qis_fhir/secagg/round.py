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
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

import orjson

#: Bonawitz et al. (CCS 2017), rounds 0-4: advertise keys, share keys, masked input, consistency check
#: (signatures over the contributor set), unmasking (reveal)
PHASES = ("advertise", "shares", "masked", "consistency", "reveal")
STAGES = ("presence", "value")
DAY = 86400.0

# why a node refuses a round message at a given time, and the state after the last window
LATE = "late"  # a new contribution after its phase's window closed
EARLY = "early"  # before the round opens, or a reveal before the consistency window closed
UNMASK = "unmask"  # what follows the last window: any member sums the round


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


# ---------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """Phase windows, in days from 00:00 UTC of ``RoundRef.opens``, run back to back.

    A day per phase lets a site's nightly run advance a round by one phase per night; the masked
    window is two days so that a site whose nightly run failed once still contributes; the reveal
    window is two days for the same reason. A whole round takes 7 days.
    """

    days: tuple[tuple[str, int], ...] = (("advertise", 1), ("shares", 1), ("masked", 2), ("consistency", 1), ("reveal", 2))

    def starts(self, opens: str) -> float:
        return datetime.combine(date.fromisoformat(opens), datetime.min.time(), UTC).timestamp()

    def closes(self, opens: str, phase: str) -> float:
        """When ``phase``'s window closes (epoch seconds)."""
        total = 0
        for name, days in self.days:
            total += days
            if name == phase:
                return self.starts(opens) + total * DAY
        raise ValueError(f"unknown phase {phase!r}")

    def refusal(self, phase: str, opens: str, now: float) -> str | None:
        """Why a *new* message of ``phase`` is refused at ``now`` (EARLY/LATE), or None."""
        if now < self.starts(opens):
            return EARLY
        if phase == "reveal" and now < self.closes(opens, "consistency"):
            return EARLY  # nothing is revealed while masked inputs or their signed roster may still change
        if now >= self.closes(opens, phase):
            return LATE
        return None

    def phase_at(self, opens: str, now: float) -> str | None:
        """The phase whose window holds ``now`` (the one a site can post: the phase before it has
        closed and can be read), None before the round opens, ``UNMASK`` once every window closed."""
        if now < self.starts(opens):
            return None
        for name, _ in self.days:
            if now < self.closes(opens, name):
                return name
        return UNMASK

    def closed(self, phase: str, opens: str, now: float) -> bool:
        return now >= self.closes(opens, phase)

    def utc(self, opens: str, phase: str) -> str:
        return datetime.fromtimestamp(self.closes(opens, phase), UTC).strftime("%Y-%m-%d %H:%M UTC")


SCHEDULE = Schedule()


def value_opens(presence: RoundRef, schedule: Schedule = SCHEDULE) -> str:
    """The day the value round opens: the presence round's unmasking day (its cells are known then)."""
    days = (schedule.closes(presence.opens, PHASES[-1]) - schedule.starts(presence.opens)) / DAY
    return (date.fromisoformat(presence.opens) + timedelta(days=int(days))).isoformat()
