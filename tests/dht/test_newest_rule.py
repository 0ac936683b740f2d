"""One rule for which copy of a (site, packet id) counts, the same in every place that holds packets.

The publish path used to keep the first copy it met at an equal seq while nodes and queries kept the
lowest hash: a site re-running one night on changed data would publish one version and every reader
would pool the other. These tests feed two different packets under one seq in both orders to every
holder (the rule itself, the replay state, a node's store, the client's publish and query) and check
that all of them keep the same one.
"""

from __future__ import annotations

import asyncio
import hashlib

from dht_cluster import fingerprint, sign, start_nodes
from test_protocol import _stop

from qis_fhir.dht.client import DhtClient
from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.storage import PacketStore
from qis_fhir.packets.codec import decode_packet
from qis_fhir.packets.newest import newest_per_packet, supersedes
from qis_fhir.packets.replay import MemoryReplayState


def _pair(net, n: int) -> tuple[bytes, bytes]:
    """Two different packets of site A for one cell under one seq, ordered (lower hash, higher hash)."""
    a = net.sites["site-a"]
    w1, w2 = sign(a, fingerprint(n), seq=7, mean_change=-1.0), sign(a, fingerprint(n), seq=7, mean_change=-9.0)
    return tuple(sorted([w1, w2], key=lambda w: hashlib.sha256(w).digest()))


def test_equal_seq_goes_to_the_lowest_wire_hash_whatever_the_order(dht_network):
    low, high = _pair(dht_network, 500)
    older = sign(dht_network.sites["site-a"], fingerprint(500), seq=6)
    for order in ([low, high, older], [older, high, low], [high, older, low]):
        kept, dropped = newest_per_packet((decode_packet(w), w) for w in order)
        assert [w for _, w in kept] == [low]
        assert dropped == 2
    newer = sign(dht_network.sites["site-a"], fingerprint(500), seq=8, mean_change=-3.0)
    kept, _ = newest_per_packet((decode_packet(w), w) for w in [low, newer, high])
    assert [w for _, w in kept] == [newer]  # a higher seq beats any rank


def test_an_unknown_rank_never_displaces_a_known_one():
    assert supersedes(5, b"\x01", 5, None)
    assert not supersedes(5, None, 5, b"\xff")
    assert not supersedes(5, None, 5, None)
    assert not supersedes(4, b"\x00", 5, b"\xff")


def test_replay_state_and_node_store_keep_the_same_copy(dht_network, tmp_path):
    low, high = _pair(dht_network, 501)
    plow, phigh = decode_packet(low), decode_packet(high)
    for first, second in ((low, high), (high, low)):
        store = PacketStore(":memory:")
        for w in (first, second):
            p = decode_packet(w)
            store.put(dht_key(p.fingerprint), p, w, 3600.0)
        assert store.page(dht_key(plow.fingerprint), None, 8000)[0] == [low]
    digests = sorted(["b" * 64, "a" * 64])
    for order in (digests, digests[::-1]):
        state = MemoryReplayState()
        sql = PacketStore(tmp_path / f"seen-{order[0][0]}.sqlite3").replay_view()
        for d in order:
            state.put("site-a", plow.packet_id, 7, d)
            sql.put("site-a", plow.packet_id, 7, d)
        sql.put("site-a", plow.packet_id, 7, None)  # a store's own note (no digest) keeps the digest
        assert state.get_digest("site-a", plow.packet_id) == sql.get_digest("site-a", plow.packet_id) == "a" * 64
    assert phigh.packet_id == plow.packet_id


def test_publish_sends_and_query_returns_the_copy_every_node_keeps(dht_network):
    low, high = _pair(dht_network, 502)
    fp = decode_packet(low).fingerprint

    async def run():
        nodes = await start_nodes(dht_network, 3, ksize=3)
        try:
            async with DhtClient([(nodes[0].host, nodes[0].port)], dht_network.manifest, ksize=3) as client:
                report = await client.publish([high, low])  # the higher-hash copy first: it must not win
                assert report.superseded_locally == 1 and report.confirmed == 1
                held = [n.storage.page(dht_key(fp), None, 8000)[0] for n in nodes]
                assert held == [[low]] * 3
                result = await client.query(fp)
                assert result.wires == [low]
        finally:
            _stop(nodes)

    asyncio.run(run())
