"""``qis-fhir bench --only evidence``: the evidence stage's cost, in parts.

Two measurements, with a network, sites and signed packets made for the run:

* **pooling**: 1,000 cells from 50 sites (50,000 real signed packets for cohorts of the shipped
  mapping): the collect layer (verify every packet, keep the newest per site and packet id, decode
  cohorts) and the pooling (``build_tables``: one fit per cell for the pooled and per-site tables,
  rank and flag, dress) timed apart, so a change in one is not hidden by the other.
* **stage**: the whole stage against N DHT nodes on 127.0.0.1 (default 30; worker processes as in
  ``qis-fhir bench --only dht``) holding 5 sites' packets for every cell: query of the full cohort
  grid through one client, collect, pooling, writing the tables and the report (and its size), each
  timed.

Seconds are wall-clock (the DHT part waits on other processes); the machines are shared, so read
them as orders of magnitude and compare parts measured in the same run.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

POOL_SITES = 50
POOL_CELLS = 1_000
STAGE_SITES = 5
STAGE_NODES = 30
KSIZE = 8
PERIODS = tuple(str(y) for y in range(2017, 2025))  # eight treatment years: the shipped mapping has 1,120 cells


def _cells(mapping: Any, grid: dict[str, tuple[str, str, str]], n: int) -> list[tuple[str, str, str, str]]:
    """``n`` cells (fingerprint, treatment, measure, period) the mapping can produce, spread over its cohorts."""
    cells = []
    for period in PERIODS:
        for fp, (bucket, _, _) in sorted(grid.items(), key=lambda kv: kv[1]):
            for tx in sorted(t.id for t in mapping.treatments.values() if bucket in t.buckets):
                cells.append((fp, tx, mapping.buckets[bucket].measures[0], period))
    if len(cells) < n:
        raise ValueError(f"the mapping has only {len(cells)} cells")
    return random.Random(1).sample(cells, n)


def _network(root: Path, sites: int) -> tuple[Any, list[Any]]:
    from qis_fhir.packets import add_site, create_network, create_site, load_network

    create_network(root / "net", network_id="bench-evidence", min_cell_size=11)
    identities = []
    for i in range(sites):
        identities.append(create_site(f"bench-hospital-{i:02d}", root / "sites" / str(i)))
        add_site(root / "net", root / "sites" / str(i))
    return load_network(root / "net"), identities


def _packets(sites: list[Any], cells: list[tuple[str, str, str, str]], seed: int) -> dict[str, list[bytes]]:
    """Every site's packet for every cell, by fingerprint; realistic counts and 4-decimal statistics."""
    from qis_fhir.packets.codec import PacketSigner, encode_packet

    rng = random.Random(seed)
    by_fp: dict[str, list[bytes]] = {}
    for site in sites:
        signer = PacketSigner(site.private_key, site.site_id, site.key_id)
        for fp, tx, measure, period in cells:
            n = rng.randint(11, 400)
            p = signer.sign(fingerprint=fp, treatment=tx, measure=measure, period=period, patients=n,
                            responders=rng.randint(0, n), mean_change=round(rng.gauss(-8, 4), 4) + 0.0,
                            sd_change=round(rng.uniform(2, 15), 4), mapping_version="v1", seq=20241201)
            by_fp.setdefault(fp, []).append(encode_packet(p))
    return by_fp


def _timed(fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and this process's CPU seconds (a busy shared machine inflates
    the first; the second is what the work costs one core)."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)


def _pooling(root: Path, seed: int) -> dict:
    from qis_fhir.evidence.collect import cohort_grid, collect_answers
    from qis_fhir.evidence.tables import build_tables
    from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping

    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # change cells, as the packets below (mapping_version v1)
    network, sites = _network(root, POOL_SITES)
    grid = cohort_grid(network, mapping)
    answers = _packets(sites, _cells(mapping, grid, POOL_CELLS), seed)
    collection, collect_s, collect_cpu = _timed(lambda: collect_answers(answers, network.manifest, grid, mapping.version))
    tables, pool_s, pool_cpu = _timed(lambda: build_tables(collection, mapping))
    return {
        "sites": POOL_SITES,
        "cells": len(tables.pooled),
        "packets": len(collection.packets),
        "collect_s": collect_s,
        "collect_cpu_s": collect_cpu,
        "collect_packets_per_cpu_s": round(len(collection.packets) / collect_cpu) if collect_cpu else None,
        "pool_s": pool_s,
        "pool_cpu_s": pool_cpu,
    }


def _stage(root: Path, nodes: int, seed: int) -> dict:
    import asyncio

    from qis_fhir.bench.dht import STOP_GRACE, start_network
    from qis_fhir.dht.client import publish_async
    from qis_fhir.dht.cluster import LOOPBACK, stop_processes
    from qis_fhir.evidence.collect import cohort_grid, collect
    from qis_fhir.evidence.report import write_report
    from qis_fhir.evidence.tables import build_tables, write_tables
    from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
    from qis_fhir.packets import load_network

    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # change cells, as the packets below (mapping_version v1)
    network, sites = _network(root, STAGE_SITES)
    grid = cohort_grid(network, mapping)
    by_fp = _packets(sites, _cells(mapping, grid, POOL_CELLS), seed)
    wires = [w for ws in by_fp.values() for w in ws]
    procs, addresses = start_network(nodes, network.manifest_path, root / "nodes", KSIZE)
    # the nodes' operator sites joined the manifest as they were certified: read it again, as a member
    # re-reads a changed manifest, or no node's certificate checks out for the publisher and reader
    network = load_network(root / "net")
    try:
        report = asyncio.run(publish_async(wires, [addresses[0]], network.manifest, ksize=KSIZE, bind=LOOPBACK))
        if report.unconfirmed:
            raise RuntimeError(f"{len(report.unconfirmed)} packets unconfirmed: the figures would mean nothing")
        boot = [addresses[len(addresses) // 2]]
        collection, query_s, query_cpu = _timed(lambda: collect(network, mapping, boot, local_site_id=sites[0].site_id, ksize=KSIZE, bind=LOOPBACK))
    finally:
        stop_processes(procs, STOP_GRACE)
    tables, pool_s, _ = _timed(lambda: build_tables(collection, mapping))
    _, write_s, _ = _timed(lambda: write_tables(tables, root / "out" / "evidence"))
    page, report_s, _ = _timed(lambda: write_report(root / "out" / "evidence"))
    return {
        "nodes": len(addresses),
        "ksize": KSIZE,
        "sites": STAGE_SITES,
        "cohorts_queried": len(grid),
        "packets_published": len(wires),
        "packets_used": len(collection.packets),
        "recall": round(len(collection.packets) / len(wires), 4),
        "query_and_collect_s": query_s,
        "query_and_collect_cpu_s": query_cpu,
        "pool_s": pool_s,
        "write_tables_s": write_s,
        "report_s": report_s,
        "report_mb": round(page.stat().st_size / 1e6, 2),
        "total_s": round(query_s + pool_s + write_s + report_s, 3),
    }


def run(options: Any) -> dict:
    seed = int(getattr(options, "seed", 7))
    nodes = (getattr(options, "nodes", None) or (STAGE_NODES,))[0]
    with tempfile.TemporaryDirectory(prefix="qis-bench-evidence-") as tmp:
        root = Path(tmp)
        return {
            "method": "real signed packets for cohorts of the shipped mapping; wall-clock (and CPU) seconds per part",
            "pooling": _pooling(root / "pooling", seed),
            "stage": _stage(root / "stage", nodes, seed),
        }
