"""Protocol mechanics in one event loop (several nodes on 127.0.0.1): size caps, verification on
arrival, hand-off to a new node, republish with the remaining lifetime, client never routed to."""

from __future__ import annotations

import asyncio
import time

import umsgpack
from dht_cluster import LOOPBACK, base_sites, fingerprint, forge, sign, start_nodes, tamper

from qis_fhir.dht.client import DhtClient
from qis_fhir.dht.keys import RPC_CAP, dht_key, pack_batches


def _stop(nodes) -> None:
    for node in nodes:
        node.close()


def test_store_batches_and_find_packets_replies_fit_the_rpc_cap(dht_network):
    fp = fingerprint(100)
    wires = [sign(site, fp, treatment=f"TX_P{i}") for site in base_sites(dht_network) for i in range(60)]
    assert len(wires) == 300

    async def run():
        nodes = await start_nodes(dht_network, 1, ksize=20)
        try:
            proto = nodes[0].protocol
            key = dht_key(fp)
            items = [[w, 86400.0] for w in wires]
            batches = pack_batches(items, proto.store_base_size(key))
            for batch in batches:  # what goes on the wire is exactly what rpcudp checks
                assert len(umsgpack.packb(["store_packets", [proto.source_node.id, key, batch]])) <= RPC_CAP
            assert len(batches) >= sum(len(w) for w in wires) // RPC_CAP  # several packets per RPC, never over
            for batch in batches:
                assert set(proto.rpc_store_packets(("127.0.0.1", 1), b"", key, batch)["s"]) == {"stored"}
            # a full routing table's worth of node triples rides on the first page
            from kademlia.node import Node
            for i in range(20):
                proto.router.add_contact(Node(bytes([i + 1]) * 20, "127.0.0.1", 40000 + i))
            got, cursor, pages = [], None, 0
            while True:
                reply = proto.rpc_find_packets(("127.0.0.1", 1), b"", key, cursor)
                assert len(umsgpack.packb(reply)) <= RPC_CAP
                assert reply["count"] == 300
                got.extend(reply["packets"])
                pages += 1
                cursor = reply["next"]
                if cursor is None:
                    break
            assert pages > 10 and sorted(got) == sorted(wires)
        finally:
            _stop(nodes)

    asyncio.run(run())


def test_rejections_are_counted_by_reason_and_never_stored(dht_network, tmp_path):
    from dht_cluster import make_network

    outsider_net = make_network(tmp_path, ["site-x"])  # a key no manifest of ours lists
    fp = fingerprint(101)
    a = dht_network.sites["site-a"]
    good = sign(a, fp, seq=10)
    forged, tampered = forge(good), tamper(good)

    async def run():
        nodes = await start_nodes(dht_network, 1)
        try:
            proto = nodes[0].protocol
            key = dht_key(fp)
            items = [[good, 60.0], [forged, 60.0], [tampered, 60.0], [sign(outsider_net.sites["site-x"], fp), 60.0],
                     [sign(a, fp, seq=9), 60.0], [sign(a, fingerprint(102)), 60.0], [b"x" * 600, 60.0], ["text", 60.0]]
            statuses = proto.rpc_store_packets(("127.0.0.1", 1), b"", key, items)["s"]
            assert statuses[0] == "stored"
            assert statuses[1:] == ["bad_signature", "bad_signature", "unknown_key", "replay", "wrong_key", "oversize", "malformed_item"]
            assert proto.rpc_store(("127.0.0.1", 1), b"", key, tampered) is False  # the stock RPC is hardened too
            assert nodes[0].storage.count() == 1
            stats = proto.rpc_stats(("127.0.0.1", 1))
            assert stats["packets"] == 1
            assert sum(stats["rejections"].values()) == 8
            assert stats["rejections"]["replay"] == 1
        finally:
            _stop(nodes)

    asyncio.run(run())


def test_new_node_is_handed_packets_under_their_own_key_and_clients_are_never_routed(dht_network):
    fp = fingerprint(103)
    wires = [sign(s, fp) for s in base_sites(dht_network)]

    async def run():
        nodes = await start_nodes(dht_network, 2, ksize=3)
        try:
            async with DhtClient([(nodes[0].host, nodes[0].port)], dht_network.manifest, ksize=3, bind=LOOPBACK) as client:
                report = await client.publish(wires)
                assert report.confirmed == 5 and report.min_replicas == 2
            for node in nodes:  # the client talked to every node, none of them routes to it
                assert len(node.contacts()) == 1
            late = (await start_nodes(dht_network, 1, ksize=3))[0]
            nodes.append(late)
            await late.join([(nodes[0].host, nodes[0].port)])
            for _ in range(100):
                if late.storage.count(dht_key(fp)) == 5:
                    break
                await asyncio.sleep(0.02)
            assert late.storage.count(dht_key(fp)) == 5
        finally:
            _stop(nodes)

    asyncio.run(run())


def test_republish_spreads_packets_but_never_extends_their_life(dht_network):
    fp = fingerprint(104)
    wires = [sign(s, fp, treatment="TX_R") for s in base_sites(dht_network)]

    async def run():
        nodes = await start_nodes(dht_network, 4, ksize=2, republish_interval=0.0)
        try:
            holder = nodes[1]
            key = dht_key(fp)
            expires = time.time() + 500
            for w in wires:
                holder.protocol.accept_packet(key, w, 500.0)
            await holder.upkeep()
            holders = [n for n in nodes if n.storage.count(key) == 5]
            assert len(holders) >= 2
            for n in holders:
                for e in n.storage.entries(key):
                    assert e.expires_at <= expires + 5  # a replica's republish passes on the remaining lifetime
            assert holder.storage.expire(time.time() + 501) == 5
        finally:
            _stop(nodes)

    asyncio.run(run())


def test_quorum_read_stops_early_only_when_the_closest_replicas_agree(dht_network):
    fp = fingerprint(105)
    key = dht_key(fp)
    a, b = base_sites(dht_network)[:2]
    everywhere, only_closest = sign(a, fp, treatment="TX_Q"), sign(b, fp, treatment="TX_Q")

    async def run():
        nodes = await start_nodes(dht_network, 5, ksize=5)
        try:
            for n in nodes:
                n.protocol.accept_packet(key, everywhere, 600.0)
            async with DhtClient([(nodes[0].host, nodes[0].port)], dht_network.manifest, ksize=5, bind=LOOPBACK, quorum=3) as client:
                agreed = await client.query(fp)
                assert agreed.wires == [everywhere] and agreed.nodes_asked == 3  # three agreed: two never asked
                closest = min(nodes, key=lambda n: n.node.distance_to(Node(key)))
                closest.protocol.accept_packet(key, only_closest, 600.0)
                split = await client.query(fp)  # the closest three now disagree: everyone is asked
                assert sorted(split.wires) == sorted([everywhere, only_closest]) and split.nodes_asked == 5
        finally:
            _stop(nodes)

    from kademlia.node import Node

    asyncio.run(run())


def test_packed_node_records_round_trip_and_refuse_garbage():
    import os

    from qis_fhir.dht.keys import pack_nodes, unpack_nodes

    triples = [(os.urandom(20), f"127.0.0.{i}", 1000 + i) for i in range(1, 17)] + [(os.urandom(20), "::1", 9)]
    blob, others = pack_nodes(triples)
    assert len(blob) == 16 * 26 and others == [[triples[-1][0], "::1", 9]]
    assert unpack_nodes(blob) == [[a, b, c] for a, b, c in triples[:-1]]
    assert unpack_nodes(blob[:-1]) == [] and unpack_nodes("text") == []
