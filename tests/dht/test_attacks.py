"""Attacks on the routing around the packets, as an attacker would run them, on 127.0.0.1.

Outsiders claim node ids next to the stored keys (the eclipse), a member mints node certificates
beyond its bound or runs lying nodes up to it, responses are forged and datagrams replayed. Under each:
honest queries keep 100% recall and every packet ``publish`` reports confirmed is really held by an
honest node. Loops are bounded; nodes are real processes (the eclipse) or nodes in the test's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from dht_cluster import LOOPBACK, Cluster, base_sites, fingerprint, make_network, sign, start_nodes

from qis_fhir.dht.certs import NodeCert, NodeIdentity, check_cert, issue_cert
from qis_fhir.dht.client import DhtClient
from qis_fhir.dht.keys import dht_key, pack_nodes
from qis_fhir.dht.node import DhtNode
from qis_fhir.dht.protocol import PacketProtocol, Peer
from qis_fhir.errors import NodeCertificateError, NoPeersError
from qis_fhir.packets.keys import raw_public
from qis_fhir.packets.manifest import load_manifest, revoke_node

pytestmark = [pytest.mark.timeout(240)]

SYBILS = 96


def _stop(nodes) -> None:
    for node in nodes:
        node.close()


def _near(key: bytes, i: int) -> bytes:
    """A node id next to ``key``: only the last two bytes differ."""
    return key[:18] + bytes([key[18] ^ (i >> 8 & 0xFF), key[19] ^ (i & 0xFF) ^ 1])


def _forged(site, manifest) -> NodeIdentity:
    """A certificate in ``site``'s name signed by a key that is not the site's."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    cert = NodeCert(manifest.network_id, site.key_id, 0, raw_public(key.public_key()), 2**40)
    return NodeIdentity(key, dataclasses.replace(cert, signature=key.sign(cert.signed_bytes())))


def _key_of_member(site, manifest, index: int) -> NodeIdentity:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return NodeIdentity(key, issue_cert(site, manifest, index, raw_public(key.public_key())))


def _minted(site, manifest, index: int) -> NodeIdentity:
    """What a member can sign with its own key whatever ``issue_cert`` allows: any index."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    cert = NodeCert(manifest.network_id, site.key_id, index, raw_public(key.public_key()), 2**40)
    return NodeIdentity(key, dataclasses.replace(cert, signature=site.private_key.sign(cert.signed_bytes())))


async def _really_held(client: DhtClient, addresses: list, fp: str) -> set:
    """Which of ``addresses`` hold which wires for ``fp`` (asked directly, all pages)."""
    held = set()
    for address in addresses:
        held.update((address, w) for w in (await client.node_holdings(address, fp)) or [])
    return held


# ---------------------------------------------------------------------- outsiders: the eclipse
def test_sybil_ids_next_to_the_stored_keys_from_one_socket_never_route(dht_network, tmp_path):
    """96 fake ids next to the stored keys, claimed from one UDP socket in every RPC to every node.

    Before node certificates this cut recall from 43 of 43 packets to 15, and a publish reported
    22/22 confirmed with nothing on an honest node. Now no fake id enters a routing table."""
    sites = base_sites(dht_network)
    stored_fps = [fingerprint(9000 + i) for i in range(43)]
    stored = {fp: sign(sites[i % len(sites)], fp) for i, fp in enumerate(stored_fps)}
    later_fps = [fingerprint(9100 + i) for i in range(22)]
    later = {fp: sign(sites[i % len(sites)], fp) for i, fp in enumerate(later_fps)}
    c = Cluster(tmp_path, dht_network.manifest, ksize=3)
    try:
        c.start(5)
        c.wait_joined()
        honest = [n.address for n in c.nodes]

        async def run():
            async with DhtClient(honest[:1], dht_network.manifest, ksize=3, bind=LOOPBACK) as client:
                assert (await client.publish(list(stored.values()))).confirmed == 43
            # the attacker: one socket, an anonymous session with each node, fake ids in every RPC it may send
            async with DhtClient(honest[:1], dht_network.manifest, ksize=3, bind=LOOPBACK) as sybil:
                proto = sybil.protocol
                keys = [dht_key(fp) for fp in stored_fps]
                fakes = [_near(keys[i % len(keys)], i) for i in range(SYBILS)]
                me = (LOOPBACK, sybil.peer.port)

                def nearest(key: bytes) -> list:
                    target = int.from_bytes(key, "big")
                    return [(f, *me) for f in sorted(fakes, key=lambda f: int.from_bytes(f, "big") ^ target)[:6]]

                # and it answers every RPC that reaches it with fake ids next to the key, "stored" for any store
                proto.rpc_find_node = lambda sender, nodeid, key: nearest(key)
                proto.rpc_find_packets = lambda sender, nodeid, key, cursor=None: {"count": 0, "n4": pack_nodes(nearest(key))[0]}
                proto.rpc_store_packets = lambda sender, nodeid, key, items: {"s": ["stored"] * len(items), "r": bytes(64)}
                for address in honest:
                    for fake, key in zip(fakes, keys * 3):
                        await proto._call("ping", address, fake)
                        await proto._call("find_node", address, fake, key)
                        await proto._call("find_packets", address, fake, key, None)
                        await proto._call("store_packets", address, fake, key, [])
                stats = [await sybil.node_stats(a) for a in honest]
            assert all(s["contacts"] <= len(honest) - 1 for s in stats)  # honest nodes only
            async with DhtClient(honest[-1:], dht_network.manifest, ksize=3, bind=LOOPBACK) as reader:
                results = await reader.query_many(stored_fps)
                recall = sum(set(r.wires) == {stored[fp]} for fp, r in results.items())
                async with DhtClient(honest[2:3], dht_network.manifest, ksize=3, bind=LOOPBACK) as publisher:
                    report = await publisher.publish(list(later.values()))
                held = {fp: await _really_held(reader, honest, fp) for fp in later_fps}
            return recall, report, held

        recall, report, held = asyncio.run(run())
    finally:
        c.stop_all()
    for node in c.nodes:  # the neighbours each node saved on stopping: honest nodes only
        neighbours = json.loads((node.data_dir / "node.json").read_text())["neighbors"]
        assert neighbours and {(h, p) for h, p in neighbours} <= set(honest)
    assert recall == 43
    assert report.confirmed == 22
    for receipt in report.receipts:  # every replica counted is a copy on an honest node
        assert len(held[receipt.fingerprint]) == receipt.replicas >= 1


# ---------------------------------------------------------------------- members
def test_a_member_cannot_mint_node_certificates_beyond_its_bound(tmp_path):
    net = make_network(tmp_path, ["site-a", "site-m"], max_nodes_per_site=2)
    manifest = load_manifest(net.manifest)
    mallory = net.sites["site-m"]
    with pytest.raises(NodeCertificateError, match="outside 0..1"):
        issue_cert(mallory, manifest, 2, bytes(32))
    beyond = _minted(mallory, manifest, 2)
    assert check_cert(beyond.cert, manifest) == "index_beyond_bound"

    async def run():
        nodes = await start_nodes(net, 3, ksize=3)
        rogue = None
        try:
            rogue = (await start_nodes(net, 1, identities=[beyond], bootstrap=[(nodes[0].host, nodes[0].port)]))[0]
            assert rogue.contacts() == []  # nobody answered it as a node
            for node in nodes[1:]:  # and nobody takes it for one when it answers
                await node.join([(rogue.host, rogue.port)])
            for node in nodes:
                assert beyond.node_id not in {n.id for n in node.contacts()}
                assert node.protocol.channel.drops["cert_index_beyond_bound"] >= 1
            with pytest.raises(NoPeersError):  # a client told to start from it finds no peer
                async with DhtClient([(rogue.host, rogue.port)], net.manifest, ksize=3, bind=LOOPBACK):
                    pass
        finally:
            _stop(nodes + ([rogue] if rogue else []))

    asyncio.run(run())


def test_revoked_node_keys_and_revoked_sites_lose_their_place(tmp_path):
    net = make_network(tmp_path, ["site-a", "site-m"], max_nodes_per_site=4)
    manifest = load_manifest(net.manifest)
    ids = [_key_of_member(net.sites["site-m"], manifest, i) for i in range(2)]

    async def run():
        nodes = await start_nodes(net, 3, ksize=5)
        members = await start_nodes(net, 2, identities=ids, bootstrap=[(nodes[0].host, nodes[0].port)])

        def known(identity) -> int:
            return sum(identity.node_id in {n.id for n in node.contacts()} for node in nodes)

        async def upkeep_until(condition) -> bool:
            for _ in range(40):  # the manifest file is looked at once a second by each node's upkeep
                if condition():
                    return True
                await asyncio.sleep(0.1)
                await asyncio.gather(*(node.upkeep() for node in nodes))
            return condition()

        try:
            for node in nodes:
                await node.join([(m.host, m.port) for m in members])
            assert known(ids[0]) == known(ids[1]) == 3
            revoke_node(net.net_dir, ids[0].cert.node_key_id)  # one lost node of the site
            assert await upkeep_until(lambda: known(ids[0]) == 0)
            assert known(ids[1]) == 3
            net.revoke("site-m")  # then the whole site
            assert await upkeep_until(lambda: known(ids[1]) == 0)
            with pytest.raises(NoPeersError):
                async with DhtClient([(members[1].host, members[1].port)], net.manifest, ksize=3, bind=LOOPBACK):
                    pass
        finally:
            _stop(nodes + members)

    asyncio.run(run())


class LyingProtocol(PacketProtocol):
    """A member's node that signs "stored" for everything, keeps nothing, and names only its accomplices."""

    accomplices: set[bytes] = set()

    def accept_packet(self, key, wire, ttl, sender=None) -> str:
        return "stored"

    def _neighbors(self, key, source) -> list:
        return [tuple(n) for n in self.contacts() if n.id in self.accomplices]

    def rpc_find_packets(self, sender, nodeid, key, cursor=None) -> dict:
        n4, nodes = pack_nodes(self._neighbors(key, None))
        return {"count": 0, "n4": n4, "nodes": nodes}


class LyingNode(DhtNode):
    protocol_class = LyingProtocol


def test_a_member_running_lying_nodes_up_to_its_bound_cannot_eclipse(tmp_path):
    """Four certified nodes of one member (its whole bound) lie about storing and hide the others;
    with k = 5 every key keeps an honest node among its closest, so a client that knows one honest
    node keeps 100% recall and every confirmed packet sits on an honest node."""
    net = make_network(tmp_path, ["site-a", "site-b", "site-m"], max_nodes_per_site=4)
    manifest = load_manifest(net.manifest)
    liars = [_key_of_member(net.sites["site-m"], manifest, i) for i in range(4)]
    LyingProtocol.accomplices = {i.node_id for i in liars}
    fps = [fingerprint(9200 + i) for i in range(20)]
    wires = {fp: [sign(net.sites[s], fp) for s in ("site-a", "site-b")] for fp in fps}

    async def run():
        honest = await start_nodes(net, 6, ksize=5)
        bad = await start_nodes(net, 4, ksize=5, identities=liars, node_class=LyingNode, bootstrap=[(honest[0].host, honest[0].port)])
        try:
            for node in honest:  # make sure the liars are known everywhere
                await node.join([(b.host, b.port) for b in bad])
            addresses = [(n.host, n.port) for n in honest]
            boot = [(bad[0].host, bad[0].port), (honest[-1].host, honest[-1].port)]
            async with DhtClient(boot, net.manifest, ksize=5, bind=LOOPBACK) as client:
                report = await client.publish([w for ws in wires.values() for w in ws])
                results = await client.query_many(fps)
                held = {fp: await _really_held(client, addresses, fp) for fp in fps}
        finally:
            _stop(honest + bad)
        return report, results, held

    report, results, held = asyncio.run(run())
    assert report.confirmed == 40
    for fp in fps:
        assert sorted(results[fp].wires) == sorted(wires[fp])
        for wire in wires[fp]:
            assert any(w == wire for _, w in held[fp])


# ---------------------------------------------------------------------- the wire
def test_forged_certificates_and_forged_responses_are_refused(dht_network):
    forged = _forged(dht_network.sites["site-a"], load_manifest(dht_network.manifest))

    async def run():
        nodes = await start_nodes(dht_network, 2, ksize=3)
        impostor = (await start_nodes(dht_network, 1, identities=[forged], bootstrap=[]))[0]
        try:
            with pytest.raises(NoPeersError):
                async with DhtClient([(impostor.host, impostor.port)], dht_network.manifest, ksize=3, bind=LOOPBACK):
                    pass
            await nodes[0].join([(impostor.host, impostor.port)])
            assert nodes[0].protocol.channel.drops["cert_bad_signature"] >= 1
            assert forged.node_id not in {n.id for n in nodes[0].contacts()}
            async with DhtClient([(n.host, n.port) for n in nodes], dht_network.manifest, ksize=3, bind=LOOPBACK) as c:
                proto = c.protocol
                s_a = proto.channel.session_at((nodes[0].host, nodes[0].port))
                s_b_at_b = next(s for s in nodes[1].protocol.channel.sessions() if s.address == (LOOPBACK, c.peer.port))
                s_b_to_a = nodes[1].protocol.channel.session_at((nodes[0].host, nodes[0].port))
                # the hook RPC handlers ask: node A's session is a certified node's, the client's is not
                assert nodes[1].protocol.is_certified(Peer(s_b_to_a.address, s_b_to_a))
                assert not nodes[1].protocol.is_certified(Peer(s_b_at_b.address, s_b_at_b))
                # 1. a response to a call pending with node A, sealed by certified node B: not A's answer
                msg_id = b"\x07" * 20
                future = asyncio.get_running_loop().create_future()
                proto._calls[msg_id] = (future, s_a)
                import umsgpack

                nodes[1].protocol.channel.send(s_b_at_b, b"\x01" + msg_id + umsgpack.packb({"count": 99}))
                for _ in range(100):
                    if proto.channel.drops["unsolicited_response"] or future.done():
                        break
                    await asyncio.sleep(0.01)
                assert proto.channel.drops["unsolicited_response"] == 1 and not future.done()
                proto._calls.pop(msg_id)
                # 2. a datagram under A's session with a forged tag (a spoofed source address)
                head = bytes([0x56]) + s_a.my_idx.to_bytes(4, "big") + (10**6).to_bytes(8, "big")
                proto.datagram_received(head + b"\x00" * 40, s_a.address)
                assert proto.channel.drops["bad_mac"] == 1
                assert (await proto._call("ping", (nodes[0].host, nodes[0].port), b""))[0]  # the session still works
        finally:
            _stop(nodes + [impostor])

    asyncio.run(run())


def test_replayed_datagrams_are_refused(dht_network):
    fp = fingerprint(9300)
    wire = sign(dht_network.sites["site-a"], fp)

    async def run():
        nodes = await start_nodes(dht_network, 1, ksize=3)
        node = nodes[0]
        try:
            async with DhtClient([(node.host, node.port)], dht_network.manifest, ksize=3, bind=LOOPBACK) as c:
                sent: list[bytes] = []
                send = c.protocol.channel._send
                c.protocol.channel._send = lambda data, address: (sent.append(data), send(data, address))[1]
                report = await c.publish([wire])
                assert report.confirmed == 1
                requests = [d for d in sent if d[0] == 0x56]
                before = dict(node.protocol.channel.drops)
                for datagram in requests:  # the same bytes again, from the same socket
                    c.peer.transport.sendto(datagram, (node.host, node.port))
                for _ in range(200):
                    if node.protocol.channel.drops["replay"] - before.get("replay", 0) == len(requests):
                        break
                    await asyncio.sleep(0.01)
                assert node.protocol.channel.drops["replay"] - before.get("replay", 0) == len(requests)
                assert c.protocol.channel.drops["unsolicited_response"] == 0  # and nothing was answered
        finally:
            _stop(nodes)

    asyncio.run(run())
