"""``qis-fhir bench --only rounds``: secure-aggregation rounds of 50 sites over the DHT.

A network made for the run (governance key, SITES sites with real keys), N nodes in one event loop of
their own thread (our ``DhtNode``: real UDP on 127.0.0.1, SQLite, ``RoundGate`` on a clock the
benchmark moves from window to window), and every site's side of the round (``SiteRound``) posting
through its own ``DhtBoard``. Both rounds of a measure: ``presence`` (one entry per cell) and
``value`` (``len(VALUE_FIELDS)`` = 6 entries per cell, every cell eligible: the worst case, as in the
offline ``secagg`` section, whose figures this one adds the DHT to).

Every site reads a closed phase from the same nodes and gets the same messages, so the benchmark
reads each phase from the DHT once (timed) and hands it to every site; what one member spends reading
is that figure. Reported per round: per-site compute (the protocol's own work, board time excluded:
median and max over sites), bytes each site publishes (message and wire bytes, per replica), the
time to post, the time one member takes to read each phase, and the time to unmask (read the five
phases afresh and sum), with the totals checked against the central sum.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SITES = 50
CELLS = 1000
NODES = 10
KSIZE = 3
OPENS = "2026-03-02"


def _network(root: Path, sites: int, nodes: int) -> tuple[Any, list[Any], list[Any]]:
    """The network, its sites' identities, and ``nodes`` certified node identities (issued before the
    network is loaded, so the sites' view of it knows the nodes' operator site)."""
    from qis_fhir.dht.cluster import certify_nodes
    from qis_fhir.packets.keys import create_site
    from qis_fhir.packets.manifest import add_site, create_network, load_network

    net = root / "net"
    create_network(net, network_id="bench-rounds")
    identities = []
    for s in range(sites):
        identities.append(create_site(f"bench-site-{s:02d}", root / "sites" / str(s)))
        add_site(net, root / "sites" / str(s))
    node_identities = certify_nodes(net / "manifest.json", nodes)
    return load_network(net), identities, node_identities


class _Timed:
    """One site's board: posts go to its own ``DhtBoard``; reads come from the shared, once-read phase."""

    def __init__(self, board: Any, shared: dict, read: Any) -> None:
        self.board, self.shared, self.read = board, shared, read
        self.seconds = 0.0

    async def post(self, phase: str, site_id: str, blob: bytes) -> None:
        started = time.perf_counter()
        await self.board.post(phase, site_id, blob)
        self.seconds += time.perf_counter() - started

    async def collect(self, phase: str) -> dict[str, bytes]:
        if phase not in self.shared:
            self.shared[phase] = await self.read(phase)
        return dict(self.shared[phase])


def _timed_collect(board: Any, seconds: dict[str, float]) -> Any:
    """``board.collect``, recording the seconds each phase's read took."""

    async def read(phase: str) -> dict[str, bytes]:
        started = time.perf_counter()
        messages = await board.collect(phase)
        seconds[phase] = round(time.perf_counter() - started, 3)
        return messages

    return read


async def _round(network: Any, identities: list[Any], addresses: list, clock: Any, stage: str, length: int, seed: int) -> dict:
    from qis_fhir.dht.board import DhtBoard
    from qis_fhir.dht.client import DhtClient
    from qis_fhir.secagg.local import STEPS
    from qis_fhir.secagg.protocol import Roster, SiteRound, unmask
    from qis_fhir.secagg.round import PHASES, SCHEDULE, RoundRef

    ref = RoundRef(network.manifest.network_id, "v1", "bench", "2025", stage, OPENS)
    roster = Roster.from_manifest(network.manifest)
    rng = np.random.default_rng(seed)
    vectors = {s.site_id: rng.integers(0, 10, length, dtype=np.uint64) for s in identities}
    rounds = [SiteRound(ref, s.site_id, s.private_key, roster, vectors[s.site_id]) for s in identities]
    shared: dict = {}
    read_seconds: dict[str, float] = {}
    async with DhtClient(addresses[:1], network.manifest, ksize=KSIZE, bind=addresses[0][0]) as client:
        read = _timed_collect(DhtBoard(client, network, ref, clock=clock), read_seconds)
        boards = {s.site_id: _Timed(DhtBoard(client, network, ref, s, clock=clock), shared, read) for s in identities}
        compute = {s.site_id: 0.0 for s in identities}
        post_seconds = 0.0
        for phase in PHASES:
            clock.t = SCHEDULE.closes(OPENS, phase) - 3600
            for r in rounds:
                board = boards[r.site_id]
                board.seconds = 0.0
                started = time.perf_counter()
                reads_before = sum(read_seconds.values())
                await getattr(r, STEPS[phase])(board)
                spent = time.perf_counter() - started
                compute[r.site_id] += spent - board.seconds - (sum(read_seconds.values()) - reads_before)
                post_seconds += board.seconds
        posted = {p: [b.board.posted[p] for b in boards.values()] for p in PHASES}
        clock.t = SCHEDULE.closes(OPENS, PHASES[-1]) + 60
        unmask_reads: dict[str, float] = {}  # a fresh board and cache: unmask reads all five phases itself
        fresh = DhtBoard(client, network, ref, clock=clock)
        unmasker = _Timed(fresh, {}, _timed_collect(fresh, unmask_reads))
        started = time.perf_counter()
        result = await unmask(ref, roster, unmasker, length)
        unmask_seconds = time.perf_counter() - started
    central = np.zeros(length, dtype=np.uint64)
    for v in vectors.values():
        central = central + v
    per_site = [sum(posted[p][i]["bytes"] for p in PHASES) for i in range(len(identities))]
    return {
        "entries": length,
        "totals_equal_central_sum": bool(np.array_equal(result.totals, central)),
        "contributors": len(result.contributors),
        "compute_s_per_site": {"median": round(statistics.median(compute.values()), 3), "max": round(max(compute.values()), 3)},
        "wire_bytes_per_site_per_replica": {"median": int(statistics.median(per_site)), "max": max(per_site)},
        "wire_bytes_by_phase_median": {p: int(statistics.median(x["bytes"] for x in posted[p])) for p in PHASES},
        "chunks_by_phase_median": {p: int(statistics.median(x["chunks"] for x in posted[p])) for p in PHASES},
        "min_replicas": min(x["min_replicas"] for p in PHASES for x in posted[p]),
        "post_s_all_sites": round(post_seconds, 2),
        "read_s_by_phase": read_seconds,
        "unmask_s": round(unmask_seconds, 2),
        "unmask_read_s": round(sum(unmask_reads.values()), 2),
    }


def run(options: Any) -> dict:
    from qis_fhir.dht.cluster import LOOPBACK, Clock, round_nodes_in_thread
    from qis_fhir.secagg.round import SCHEDULE
    from qis_fhir.secagg.values import VALUE_FIELDS

    sizes = getattr(options, "nodes", None)
    nodes = sizes[0] if sizes else NODES
    out: dict = {
        "method": f"{SITES} sites, {CELLS} cells; {nodes} nodes (k={KSIZE}) in one event loop of their own thread on 127.0.0.1, "
        "the sites in the main thread: node and site work share the 2 cores; each closed phase read once and given to every site",
        "sites": SITES,
        "cells": CELLS,
        "nodes": nodes,
        "ksize": KSIZE,
    }
    with tempfile.TemporaryDirectory(prefix="qis-bench-rounds-") as tmp:
        network, identities, node_identities = _network(Path(tmp), SITES, nodes)
        clock = Clock(SCHEDULE.starts(OPENS))
        with round_nodes_in_thread(network.manifest_path, clock, node_identities, KSIZE) as addresses:
            assert addresses[0][0] == LOOPBACK
            for stage, length, seed in (("presence", CELLS, 1), ("value", CELLS * len(VALUE_FIELDS), 2)):
                out[stage] = asyncio.run(_round(network, identities, addresses, clock, stage, length, seed))
    return out
