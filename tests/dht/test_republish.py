"""Packets outlive their publisher and the nodes first given them: holders republish them."""

from __future__ import annotations

import asyncio
import time

import pytest
from dht_cluster import LOOPBACK, Cluster, fingerprint, sign

from qis_fhir.dht.client import DhtClient, publish, query
from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.node import node_id_from_state, read_node_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
K = 3


def _fp_away_from(node_ids: list[bytes], avoid: bytes) -> str:
    """A fingerprint whose K+1 closest nodes do not include ``avoid`` (the bootstrap node stays up)."""
    for n in range(7000, 8000):
        fp = fingerprint(n)
        key = int.from_bytes(dht_key(fp), "big")
        closest = sorted(node_ids, key=lambda i: int.from_bytes(i, "big") ^ key)[: K + 1]
        if avoid not in closest:
            return fp
    raise AssertionError("no such fingerprint")


def test_packets_survive_every_original_holder_going_away(dht_network, tmp_path):
    c = Cluster(tmp_path, dht_network.manifest, ksize=K, extra=["--republish-interval", "1", "--maintenance-interval", "0.5"])
    try:
        c.start(9)
        c.wait_joined()
        ids = {n.index: node_id_from_state(read_node_state(n.data_dir)) for n in c.nodes}
        fp = _fp_away_from(list(ids.values()), ids[0])
        wires = [sign(dht_network.sites[s], fp, treatment="TX_OUT") for s in ("site-a", "site-b")]
        report = publish(wires, [c.nodes[0].address], dht_network.manifest, ksize=K, bind=LOOPBACK)
        assert report.min_replicas == K  # the publisher (a short-lived client) is gone from here on

        async def holders() -> list:
            async with DhtClient([c.nodes[0].address], dht_network.manifest, ksize=K, bind=LOOPBACK, rpc_timeout=1.0) as client:
                return [n for n in c.live() if await client.node_holdings(n.address, fp)]

        first = asyncio.run(holders())
        assert len(first) >= K and c.nodes[0] not in first
        for node in first[:-1]:
            c.kill(node)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # the last original holder republishes to the new closest nodes
            fresh = [n for n in asyncio.run(holders()) if n not in first]
            if len(fresh) >= K - 1:
                break
            time.sleep(0.5)
        assert len(fresh) >= K - 1
        c.kill(first[-1])
        assert not set(n.index for n in first) & set(n.index for n in c.live())
        result = query(fp, [c.nodes[0].address], dht_network.manifest, ksize=K, bind=LOOPBACK, rpc_timeout=1.0)
        key = int.from_bytes(dht_key(fp), "big")
        order = sorted(ids, key=lambda i: int.from_bytes(ids[i], "big") ^ key)
        assert sorted(result.wires) == sorted(wires), (
            f"closest-first {order}, original holders {[n.index for n in first]}, new {[n.index for n in fresh]}, {result.to_dict()}"
        )
    finally:
        c.stop_all()


def test_packets_expire_on_the_nodes_lifetime_whatever_the_publisher_asks(dht_network, tmp_path):
    ttl_s = 3.0
    c = Cluster(tmp_path, dht_network.manifest, ksize=2,
                extra=["--ttl-days", str(ttl_s / 86400), "--maintenance-interval", "0.5", "--republish-interval", "0.5"])
    try:
        c.start(3)
        c.wait_joined()
        fp = fingerprint(8000)
        wire = sign(dht_network.sites["site-a"], fp, treatment="TX_EXP")
        report = publish([wire], [c.nodes[0].address], dht_network.manifest, ksize=2, bind=LOOPBACK)  # asks for 30 days
        assert report.min_replicas == 2
        assert query(fp, [c.nodes[1].address], dht_network.manifest, ksize=2, bind=LOOPBACK).wires == [wire]

        async def held() -> int:
            async with DhtClient([c.nodes[0].address], dht_network.manifest, ksize=2, bind=LOOPBACK) as client:
                return sum([bool(await client.node_holdings(n.address, fp)) for n in c.nodes])

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and asyncio.run(held()):
            time.sleep(0.5)  # republishing (every 0.5 s here) passes on the remaining lifetime only
        assert asyncio.run(held()) == 0
        assert query(fp, [c.nodes[1].address], dht_network.manifest, ksize=2, bind=LOOPBACK).wires == []
    finally:
        c.stop_all()
