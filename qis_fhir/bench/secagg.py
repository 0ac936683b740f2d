"""``qis-fhir bench --only secagg``: both secure-aggregation rounds of one (measure, period).

``SITES`` sites (default 50) and ``CELLS`` cells (default 1,000), every cell eligible for the value
round (the worst case: its vectors are ``len(VALUE_FIELDS)`` = 6 ring elements per cell), over a
``LocalBoard`` in one process, so the figures are the protocol's own cost without the network's.
Per site: CPU seconds of its five phase steps (``time.process_time``; median and maximum over the
sites) and bytes it publishes (its messages, signatures included; the DHT transport adds its packet
framing and encryption on top). Unmasking: CPU seconds for one member to compute the totals from the
board (every member can). Measured in one process, one site after another, so nothing waits for a core.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.packets.keys import raw_public
from qis_fhir.secagg.local import STEPS, LocalBoard
from qis_fhir.secagg.protocol import Roster, SiteRound, threshold, unmask
from qis_fhir.secagg.round import PHASES, RoundRef
from qis_fhir.secagg.values import VALUE_FIELDS

SITES = 50
CELLS = 1_000


async def _round(stage: str, vectors: dict[str, np.ndarray], keys: dict, roster: Roster) -> dict:
    ref = RoundRef("bench", "v1", "systolic_bp", "2024", stage, "2026-02-05")
    board = LocalBoard()
    parts = [SiteRound(ref, s, keys[s], roster, vectors[s]) for s in vectors]
    cpu = dict.fromkeys(vectors, 0.0)
    for phase in PHASES:
        for p in parts:
            t0 = time.process_time()
            await getattr(p, STEPS[phase])(board)
            cpu[p.site_id] += time.process_time() - t0
        board.close(phase)
    t0 = time.process_time()
    result = await unmask(ref, roster, board, len(next(iter(vectors.values()))))
    unmask_s = time.process_time() - t0
    expected = np.zeros_like(result.totals)
    for v in vectors.values():
        expected = expected + v
    if not np.array_equal(result.totals, expected):
        raise AssertionError("the benchmark's totals are not the sum of its inputs")
    sent = [board.bytes_posted(s) for s in vectors]
    return {
        "vector_elements": len(expected),
        "site_cpu_s_median": round(statistics.median(cpu.values()), 3),
        "site_cpu_s_max": round(max(cpu.values()), 3),
        "site_bytes_median": int(statistics.median(sent)),
        "site_bytes_max": max(sent),
        "masked_vector_bytes": 8 * len(expected),
        "unmask_cpu_s": round(unmask_s, 3),
    }


def run(options) -> dict:
    sites = SITES if not options.nodes else options.nodes[0]
    rng = np.random.default_rng(options.seed)
    ids = [f"site-{i:03d}" for i in range(sites)]
    keys = {s: Ed25519PrivateKey.generate() for s in ids}
    roster = Roster({s: (raw_public(k.public_key()),) for s, k in keys.items()}, 3)
    presence = {s: rng.integers(0, 2, CELLS).astype(np.uint64) for s in ids}
    values = {s: rng.integers(0, 10**6, CELLS * len(VALUE_FIELDS)).astype(np.uint64) for s in ids}
    return {
        "sites": sites,
        "cells": CELLS,
        "threshold": threshold(sites, 3),
        "presence": asyncio.run(_round("presence", presence, keys, roster)),
        "value": asyncio.run(_round("value", values, keys, roster)),
    }
