"""``DhtBoard``: the secure-aggregation ``Board`` over the DHT client.

``post`` seals one phase message of this site into chunks (``qis_fhir.dht.rounds``) and stores them on
the ``ksize`` closest nodes of the (round, site) key; every chunk must be confirmed by at least one
replica. ``collect`` reads the key of every member site key the manifest does not revoke, verifies and
reassembles each site's message, and keeps what it could not use (equivocation, incomplete, invalid)
in ``reads[phase]`` for the round's report.

The board holds the schedule on the site's side too: it posts only inside a phase's window and reads a
phase only after its window closed (a reader earlier than that could see a roster that still grows),
and it refuses to post a second, different message for a phase (a re-run within a round), before
anything is sent. The nodes enforce the same rules independently (``RoundGate``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from qis_fhir.dht.rounds import ChunkVerifier, PhaseRead, RoundKeys, location, reassemble, retention, round_key, seal
from qis_fhir.dht.storage import CONFIRMED
from qis_fhir.errors import PublishIncompleteError, RoundRepeatedError, RoundWindowError, UsageError
from qis_fhir.secagg.round import LATE, PHASES, SCHEDULE, RoundRef, Schedule


class DhtBoard:
    """``Board`` of one round for one member: ``network`` is its ``NetworkContext`` (manifest and
    secret), ``site`` its ``SiteIdentity`` (None: read only), ``client`` a started ``DhtClient``."""

    def __init__(
        self,
        client: Any,
        network: Any,
        ref: RoundRef,
        site: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        schedule: Schedule = SCHEDULE,
        concurrency: int = 8,
    ) -> None:
        manifest = network.manifest
        manifest.require_format(2, "secure aggregation")
        if ref.network_id != manifest.network_id:
            raise UsageError(f"round of network {ref.network_id} read with the manifest of network {manifest.network_id}")
        self.client = client
        self.manifest = manifest
        self.ref = ref
        self.site = site
        self.clock = clock
        self.schedule = schedule
        self.concurrency = concurrency
        self.keys = RoundKeys.derive(ref, network.secret)
        self.verifier = ChunkVerifier(manifest)
        self.reads: dict[str, PhaseRead] = {}
        self.posted: dict[str, dict] = {}  # phase -> chunks, bytes on the wire, fewest replicas of a chunk

    def _check_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise UsageError(f"unknown round phase {phase!r} (one of {', '.join(PHASES)})")

    async def _wires(self, key_id: str) -> set[bytes]:
        wires, _ = await self.client.fetch(location(self.keys.tag, key_id))
        return wires

    async def read(self, phase: str, key_ids: list[str]) -> PhaseRead:
        """Every message of ``phase`` under the given site keys (no window check: ``collect`` does it)."""
        slots = asyncio.Semaphore(self.concurrency)

        async def one(key_id: str) -> set[bytes]:
            async with slots:
                return await self._wires(key_id)

        found = await asyncio.gather(*(one(k) for k in key_ids))
        return reassemble((w for ws in found for w in ws), ref=self.ref, keys=self.keys, phase=phase, verifier=self.verifier)

    async def post(self, phase: str, site_id: str, blob: bytes) -> None:
        self._check_phase(phase)
        if self.site is None or site_id != self.site.site_id:
            raise UsageError(f"this board posts as {getattr(self.site, 'site_id', 'nobody')}, not as {site_id}")
        now = self.clock()
        refusal = self.schedule.refusal(phase, self.ref.opens, now)
        if refusal is not None:
            when = "closed" if refusal == LATE else "is not open yet"
            raise RoundWindowError(
                f"the {phase} window of round {self.ref.measure} {self.ref.period} ({self.ref.stage}) {when} "
                f"(it closes {self.schedule.utc(self.ref.opens, phase)}); nodes refuse this message"
            )
        mine = await self.read(phase, [self.site.key_id])
        held = mine.messages.get(site_id)
        if (held is not None and held != blob) or site_id in mine.equivocated:
            raise RoundRepeatedError(
                f"this site already posted a different {phase} message in round {self.ref.measure} {self.ref.period} "
                f"({self.ref.stage}): one message per site and phase, a re-run cannot change it"
            )
        wires = seal(blob, ref=self.ref, keys=self.keys, phase=phase, key_id=self.site.key_id, sign=self.site.private_key.sign)
        ttl = retention(self.ref, now, self.schedule)
        results, _ = await self.client.store_items(round_key(self.keys.tag, self.site.key_id), [[w, ttl] for w in wires])
        replicas = [0] * len(wires)
        refused: Counter[str] = Counter()
        for statuses in results:
            for i, status in enumerate(statuses):
                if status in CONFIRMED:
                    replicas[i] += 1
                else:
                    refused[status] += 1
        self.posted[phase] = {"chunks": len(wires), "bytes": sum(map(len, wires)), "min_replicas": min(replicas)}
        if min(replicas) == 0:
            why = ", ".join(f"{r} {n}" for r, n in sorted(refused.items())) or "no node answered"
            raise PublishIncompleteError(
                f"{sum(1 for r in replicas if r == 0)} of {len(wires)} chunks of this site's {phase} message "
                f"were confirmed by no replica (nodes answered: {why})"
            )

    async def collect(self, phase: str) -> dict[str, bytes]:
        self._check_phase(phase)
        if not self.schedule.closed(phase, self.ref.opens, self.clock()):
            raise RoundWindowError(
                f"the {phase} window of round {self.ref.measure} {self.ref.period} ({self.ref.stage}) closes "
                f"{self.schedule.utc(self.ref.opens, phase)}: its messages are read after that"
            )
        revoked = self.manifest.revoked_key_ids
        read = await self.read(phase, sorted(s.key_id for s in self.manifest.sites if s.key_id not in revoked))
        self.reads[phase] = read
        return dict(read.messages)
