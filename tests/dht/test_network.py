"""Real node processes on 127.0.0.1 (``python -m qis_fhir node``), ksize 5 on 20 nodes.

One cluster serves the module; the test that kills nodes runs last. Every process is stopped by PID
in the fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from dht_cluster import (
    BASE_SITES,
    LOOPBACK,
    base_sites,
    fingerprint,
    forge,
    joined_cluster,
    make_network,
    sign,
    tamper,
)

from qis_fhir.dht.client import DhtClient, publish, query
from qis_fhir.dht.keys import dht_key
from qis_fhir.packets.codec import decode_packet
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import add_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KSIZE = 5
N_NODES = 20


@pytest.fixture(scope="module")
def cluster(dht_network, tmp_path_factory):
    with joined_cluster(tmp_path_factory.mktemp("cluster20"), dht_network.manifest, N_NODES, KSIZE) as c:
        yield c


def _ident(wire: bytes) -> tuple[str, str, int]:
    p = decode_packet(wire)
    return (p.site_id, p.packet_id, p.seq)


async def _query_from_each(nodes, manifest, fps, **kw):
    out = {}
    for node in nodes:
        async with DhtClient([node.address], manifest, ksize=KSIZE, bind=LOOPBACK, **kw) as client:
            out[node.index] = await client.query_many(fps)
    return out


async def _holdings(nodes, manifest, fp, bootstrap):
    async with DhtClient([bootstrap], manifest, ksize=KSIZE, bind=LOOPBACK) as client:
        return {n.index: await client.node_holdings(n.address, fp) for n in nodes}


def test_every_node_sees_every_sites_packets_once(cluster, dht_network):
    fps = [fingerprint(1000 + i) for i in range(6)]
    sites = base_sites(dht_network)
    expected: dict[str, set] = {fp: set() for fp in fps}
    for i, site in enumerate(sites):  # each site publishes through a different node
        wires = [sign(site, fp, treatment=f"TX_{t}") for fp in fps for t in ("A", "B")]
        report = publish(wires, [cluster.nodes[(3 * i + 1) % N_NODES].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
        why = {**report.to_dict(), "unconfirmed": [(r.asked, r.refused) for r in report.unconfirmed]}
        assert report.confirmed == len(wires) and report.min_replicas >= 3, why
        for w in wires:
            expected[decode_packet(w).fingerprint].add(_ident(w))
    # a newer sequence of one site's packet supersedes its older one everywhere it matters
    newer = sign(sites[0], fps[0], treatment="TX_A", seq=2, mean_change=-9.0)
    assert publish([newer], [cluster.nodes[7].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK).min_replicas >= 3
    expected[fps[0]] = {x for x in expected[fps[0]] if x[:2] != _ident(newer)[:2]} | {_ident(newer)}

    results = asyncio.run(_query_from_each(cluster.nodes, dht_network.manifest, fps))
    for index, by_fp in results.items():
        for fp in fps:
            got = [_ident(w) for w in by_fp[fp].wires]
            assert len(got) == len(set(got)), f"duplicates from node {index}"
            assert set(got) == expected[fp], f"node {index} fingerprint {fp[:8]}: missing {len(expected[fp] - set(got))}, {by_fp[fp].to_dict()}"
            assert {p.site_id for p in by_fp[fp].packets} == set(BASE_SITES)
            assert by_fp[fp].rejected == {}


def test_forged_tampered_unknown_revoked_and_replayed_stores_are_rejected_everywhere(cluster, dht_network, tmp_path):
    fp = fingerprint(2000)
    key = dht_key(fp)
    a = dht_network.sites["site-a"]
    good_old, good_new = sign(a, fp, seq=1), sign(a, fp, seq=2, mean_change=-6.0)
    report = publish([good_new], [cluster.nodes[2].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert report.min_replicas >= 3
    outsider = make_network(tmp_path / "other", ["site-x"]).sites["site-x"]
    revoked_site = dht_network.add("site-revoked", tmp_path / "sites")
    revoked_wire = sign(revoked_site, fp)
    dht_network.revoke("site-revoked")
    time.sleep(1.5)  # nodes re-read a changed manifest at most once a second
    attacks = {
        "bad_signature": [forge(good_new), tamper(good_new)],
        "unknown_key": [sign(outsider, fp)],
        "revoked_key": [revoked_wire],
    }

    async def attack():
        async with DhtClient([cluster.nodes[0].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK) as client:
            proto = client.protocol
            holders_before = {i for i, w in (await _holdings(cluster.nodes, dht_network.manifest, fp, cluster.nodes[0].address)).items() if w}
            assert len(holders_before) >= 3
            before = {n.index: (await client.node_stats(n.address))["rejections"] for n in cluster.nodes}
            for node in cluster.nodes:  # straight to each node's store RPCs, ours and the stock one
                for reason, wires in attacks.items():
                    ok, reply = await proto._call("store_packets", node.address, b"", key, [[w, 3600.0] for w in wires])
                    assert ok and reply["s"] == [reason] * len(wires)
                    ok, stored = await proto._call("store", node.address, b"", key, wires[0])
                    assert ok and stored is False
                if node.index in holders_before:  # the replay goes where the newer packet is
                    ok, reply = await proto._call("store_packets", node.address, b"", key, [[good_old, 3600.0]])
                    assert ok and reply["s"] == ["replay"]
            after = {n.index: (await client.node_stats(n.address))["rejections"] for n in cluster.nodes}
            return holders_before, before, after

    holders, before, after = asyncio.run(attack())
    for node in cluster.nodes:
        delta = {r: after[node.index].get(r, 0) - before[node.index].get(r, 0) for r in after[node.index]}
        assert delta.get("bad_signature", 0) >= 3 and delta.get("unknown_key", 0) >= 2 and delta.get("revoked_key", 0) >= 2
        if node.index in holders:
            assert delta.get("replay", 0) >= 1
    holdings = asyncio.run(_holdings(cluster.nodes, dht_network.manifest, fp, cluster.nodes[0].address))
    bad = {w for ws in attacks.values() for w in ws} | {good_old}
    for index, wires in holdings.items():
        assert wires is not None and not (set(wires) & bad), f"node {index} holds a rejected packet"
        assert set(wires) <= {good_new}
    result = query(fp, [cluster.nodes[5].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert result.wires == [good_new]


def test_a_site_that_joins_later_publishes_and_queries_at_once_and_is_seen(cluster, dht_network, tmp_path):
    fp = fingerprint(1000)  # a fingerprint the first five sites already published
    late = create_site("site-late", tmp_path / "site-late")
    add_site(dht_network.net_dir, tmp_path / "site-late")  # governance re-signs the manifest; nodes re-read it
    wire = sign(late, fp, treatment="TX_LATE")
    report = publish([wire], [cluster.nodes[11].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert report.confirmed == 1 and report.min_replicas >= 3, report.to_dict()
    mine = query(fp, [cluster.nodes[11].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert "site-late" in {p.site_id for p in mine.packets}
    assert {"site-a", "site-b", "site-c", "site-d", "site-e"} <= {p.site_id for p in mine.packets}
    for node in (cluster.nodes[0], cluster.nodes[6], cluster.nodes[17]):
        theirs = query(fp, [node.address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
        assert wire in theirs.wires


def test_a_fingerprint_with_300_packets_comes_back_whole(cluster, dht_network):
    fp = fingerprint(3000)
    wires = [sign(site, fp, treatment=f"TX_P{i}") for site in base_sites(dht_network) for i in range(60)]
    report = publish(wires, [cluster.nodes[4].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert report.confirmed == 300 and report.min_replicas >= 3
    for node in (cluster.nodes[1], cluster.nodes[13]):
        result = query(fp, [node.address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
        if sorted(result.wires) != sorted(wires) or result.pages < 1:
            held = asyncio.run(_holdings(cluster.nodes, dht_network.manifest, fp, cluster.nodes[0].address))
            why = {"query": result.to_dict(), "held": {i: len(w or []) for i, w in held.items()}, "publish": report.to_dict()}
        else:
            why = {}
        assert sorted(result.wires) == sorted(wires), why
        assert result.pages >= 1, why  # it took more than the first page


def test_a_burst_of_2000_packets_is_confirmed_without_a_single_timeout(cluster, dht_network):
    fps = [fingerprint(9000 + i) for i in range(400)]
    wires = [sign(site, fp) for site in base_sites(dht_network) for fp in fps]
    report = publish(wires, [cluster.nodes[3].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    summary = report.to_dict()
    assert summary["confirmed"] == 2000 and summary["min_replicas"] >= 3, summary
    assert summary["rpc_timeouts"] == 0 and "no_reply" not in summary["refused_by_nodes"], summary
    assert summary["rpcs"] < 2000 * KSIZE  # several packets per store RPC


def test_restart_serves_held_packets_and_30_percent_dead_loses_nothing(cluster, dht_network):
    fps = [fingerprint(4000 + i) for i in range(8)]
    wires = [sign(site, fp) for site in base_sites(dht_network) for fp in fps]
    report = publish(wires, [cluster.nodes[9].address], dht_network.manifest, ksize=KSIZE, bind=LOOPBACK)
    assert report.min_replicas >= 3
    holdings = asyncio.run(_holdings(cluster.nodes, dht_network.manifest, fps[0], cluster.nodes[0].address))
    holder = next(cluster.nodes[i] for i, w in holdings.items() if w and i != 0)
    held = sorted(holdings[holder.index])

    cluster.kill(holder)  # SIGKILL: no clean shutdown
    cluster.restart(holder, [cluster.nodes[0].address])
    again = asyncio.run(_holdings([holder], dht_network.manifest, fps[0], cluster.nodes[0].address))
    assert sorted(again[holder.index]) == held

    rng = random.Random(4)
    victims = rng.sample([n for n in cluster.nodes if n.index != 0], int(0.3 * N_NODES))
    for node in victims:
        cluster.kill(node)
    survivors = [n for n in cluster.live()]
    assert len(survivors) == N_NODES - len(victims)
    results = asyncio.run(_query_from_each(survivors[:3], dht_network.manifest, fps, rpc_timeout=1.0))
    expected = {fp: {w for w in wires if decode_packet(w).fingerprint == fp} for fp in fps}
    for index, by_fp in results.items():
        for fp in fps:
            assert set(by_fp[fp].wires) == expected[fp], f"from node {index}: {len(expected[fp] - set(by_fp[fp].wires))} missing"
