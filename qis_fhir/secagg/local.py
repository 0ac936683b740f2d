"""An in-memory board and a driver that runs one round for many sites in one process.

What the offline tests and the benchmark use; the DHT board (``qis_fhir.dht``) replaces
``LocalBoard`` between real sites, where each site runs its own ``SiteRound`` step by step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.errors import RoundRepeatedError, SecAggAbortedError
from qis_fhir.secagg.protocol import Roster, RoundJournal, RoundResult, SiteRound, unmask
from qis_fhir.secagg.release import eligible, release_table
from qis_fhir.secagg.round import PHASES, RoundRef
from qis_fhir.secagg.values import VALUE_FIELDS, SiteInput, decode_totals

#: SiteRound's method for each phase
STEPS = dict(zip(PHASES, ("advertise", "share", "contribute", "confirm", "reveal")))


class LocalBoard:
    """Messages per phase in memory. Like the DHT nodes, it refuses a second, different message from a
    site for one phase, and a message for a phase that was closed (its window is over)."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[str, bytes]] = {phase: {} for phase in PHASES}
        self.closed: set[str] = set()

    async def post(self, phase: str, site_id: str, blob: bytes) -> None:
        if phase not in self.messages:
            raise ValueError(f"unknown phase {phase!r}")
        if phase in self.closed:
            raise RoundRepeatedError(f"the {phase} window of this round is closed: a late message is refused")
        before = self.messages[phase].get(site_id)
        if before is not None and before != blob:
            raise RoundRepeatedError(f"site {site_id} already posted a different {phase} message in this round")
        self.messages[phase][site_id] = blob

    async def collect(self, phase: str) -> dict[str, bytes]:
        return dict(self.messages[phase])

    def close(self, phase: str) -> None:
        self.closed.add(phase)

    def bytes_posted(self, site_id: str) -> int:
        return sum(len(m.get(site_id, b"")) for m in self.messages.values())


async def run_round(participants: Sequence[SiteRound], board, *, stop_before: Mapping[str, str] | None = None,
                    length: int | None = None) -> RoundResult:
    """Run every participant through the phases in order, closing each phase before the next (a
    ``LocalBoard``), then unmask. ``stop_before``: site id -> the phase from which that site sends
    nothing (a site that crashes or goes offline there). A site whose own checks stop the round for
    it (``SecAggAbortedError``) sends nothing more, as it would on its own; the reason is kept in its
    ``stopped``. Unmasking raises ``SecAggAbortedError`` when the round did not complete."""
    stop_before = dict(stop_before or {})
    if not participants:
        raise ValueError("a round needs participants")
    for phase in PHASES:
        for p in participants:
            stop = stop_before.get(p.site_id)
            if p.stopped or (stop is not None and PHASES.index(phase) >= PHASES.index(stop)):
                continue
            try:
                await getattr(p, STEPS[phase])(board)
            except SecAggAbortedError as exc:
                p.stopped = str(exc)
        if hasattr(board, "close"):
            board.close(phase)
    first = participants[0]
    return await unmask(first.ref, first.roster, board, len(first.vector) if length is None else length)


@dataclass
class SecureRelease:
    """Both rounds of one (mapping version, measure, period), as every member computes them."""

    table: pd.DataFrame  # the shown secure totals (``release.release_table``)
    presence: RoundResult
    value: RoundResult | None  # None: no cell had patients at m sites, so no value round ran
    eligible: np.ndarray  # indices of the round's cells that went into the value round
    decoded: np.ndarray  # their value totals, int64 (eligible, VALUE_FIELDS)


async def aggregate(inputs: Mapping[str, SiteInput], keys: Mapping[str, Ed25519PrivateKey], roster: Roster,
                    refs: tuple[RoundRef, RoundRef], min_cell_size: int, *, boards: tuple | None = None,
                    journals: Mapping[str, RoundJournal] | None = None,
                    stop_before: tuple[Mapping[str, str], Mapping[str, str]] = ({}, {})) -> SecureRelease:
    """The presence round over every cell, then the value round over the eligible cells with the same
    contributors, for sites in one process (tests, benchmark); the rules are ``release``'s."""
    presence_board, value_board = boards if boards is not None else (LocalBoard(), LocalBoard())
    journals = journals or {}
    cells = next(iter(inputs.values())).cells
    presence = await run_round([SiteRound(refs[0], s, keys[s], roster, inp.presence_vector(), journals.get(s))
                                for s, inp in inputs.items()], presence_board, stop_before=stop_before[0])
    idx = eligible(presence.totals, roster.min_sites)
    if not len(idx):
        return SecureRelease(release_table(refs[1], cells, idx, np.zeros((0, len(VALUE_FIELDS)), np.int64), min_cell_size,
                                           roster.min_sites), presence, None, idx, np.zeros((0, len(VALUE_FIELDS)), np.int64))
    value = await run_round([SiteRound(refs[1], s, keys[s], roster, inputs[s].value_vector(idx), journals.get(s),
                                       required_contributors=presence.contributors)
                             for s in inputs if s in presence.contributors], value_board, stop_before=stop_before[1])
    decoded = decode_totals(value.totals, len(idx))
    return SecureRelease(release_table(refs[1], cells, idx, decoded, min_cell_size, roster.min_sites), presence, value, idx, decoded)
