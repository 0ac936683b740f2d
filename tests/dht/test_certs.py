"""Node certificates and the authenticated wire, without sockets where a socket adds nothing.

Two ``SecureChannel``s are wired to each other through the event loop, so a handshake, a replay or a
flood of handshakes is exactly what the node would see, datagram for datagram.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import pytest
from dht_cluster import REPO, make_network

from qis_fhir.dht.certs import (
    CertChecker,
    NodeIdentity,
    check_cert,
    issue_cert,
    load_identity,
    node_id_for,
    write_node_cert,
)
from qis_fhir.dht.session import SecureChannel
from qis_fhir.errors import ExitCode, NodeCertificateError
from qis_fhir.packets.keys import raw_public
from qis_fhir.packets.manifest import load_manifest, revoke_node


def _identity(site, manifest, index: int, **kw) -> NodeIdentity:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return NodeIdentity(key, issue_cert(site, manifest, index, raw_public(key.public_key()), **kw))


def test_the_node_id_comes_from_the_site_and_the_index_never_from_the_node_key(tmp_path):
    net = make_network(tmp_path, ["site-a", "site-b"], max_nodes_per_site=3)
    m = load_manifest(net.manifest)
    a, b = net.sites["site-a"], net.sites["site-b"]
    ids = {_identity(a, m, 1).node_id for _ in range(5)}  # five fresh keys, one place in the id space
    assert ids == {node_id_for(a.key_id, 1)}
    assert len({node_id_for(s.key_id, i) for s in (a, b) for i in range(3)}) == 6


def test_certificates_are_refused_for_every_reason_the_network_has(tmp_path):
    net = make_network(tmp_path, ["site-a", "site-b"], max_nodes_per_site=2)
    m = load_manifest(net.manifest)
    a = net.sites["site-a"]
    good = _identity(a, m, 0).cert
    assert check_cert(good, m) is None
    assert check_cert(_identity(a, m, 1, days=1, now=0).cert, m) == "expired"
    assert check_cert(dataclasses.replace(good, index=1), m) == "bad_signature"  # another index than signed
    assert check_cert(dataclasses.replace(good, network_id="other-net"), m) == "wrong_network"
    other = make_network(tmp_path / "o", ["site-x"])  # another network under the same name: not our site
    assert check_cert(_identity(other.sites["site-x"], load_manifest(other.manifest), 0).cert, m) == "unknown_site"
    revoke_node(net.net_dir, good.node_key_id)
    assert check_cert(good, load_manifest(net.manifest)) == "revoked_node"
    net.revoke("site-a")
    m2 = load_manifest(net.manifest)
    assert check_cert(_identity(net.sites["site-b"], m2, 0).cert, m2) is None
    with pytest.raises(NodeCertificateError, match="revokes site site-a"):
        issue_cert(a, m2, 0, bytes(32))


def test_node_cert_command_and_a_node_without_a_good_certificate(tmp_path):
    net = make_network(tmp_path, ["site-a"], max_nodes_per_site=2)

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qis_fhir", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=60)

    site_dir = net.sites["site-a"].site_dir
    r = cli("node-cert", "--site", site_dir, "--network", net.manifest, "--index", 2, "--node-dir", tmp_path / "n2")
    assert r.returncode == ExitCode.NODE_CERTIFICATE_INVALID and "outside 0..1" in r.stderr
    r = cli("node", "--listen", "127.0.0.1:0", "--data-dir", tmp_path / "n0", "--network", net.manifest)
    assert r.returncode == ExitCode.NODE_CERTIFICATE_INVALID and "qis-fhir node-cert" in r.stderr
    r = cli("node-cert", "--site", site_dir, "--network", net.manifest, "--index", 1, "--node-dir", tmp_path / "n0")
    assert r.returncode == 0, r.stderr
    identity = load_identity(tmp_path / "n0", load_manifest(net.manifest))
    assert identity.node_id == node_id_for(net.sites["site-a"].key_id, 1)
    assert (tmp_path / "n0" / "node_key.pem").stat().st_mode & 0o077 == 0
    revoke_node(net.net_dir, identity.cert.node_key_id)
    r = cli("node", "--listen", "127.0.0.1:0", "--data-dir", tmp_path / "n0", "--network", net.manifest)
    assert r.returncode == ExitCode.NODE_CERTIFICATE_INVALID and "revoked node" in r.stderr
    # a re-issued certificate for the same directory keeps the key: the revocation still holds
    write_node_cert(tmp_path / "n0", net.sites["site-a"], load_manifest(net.manifest), 0)
    with pytest.raises(NodeCertificateError, match="revoked node"):
        load_identity(tmp_path / "n0", load_manifest(net.manifest))


class _Wire:
    """Channels that deliver to each other through the event loop; ``log`` keeps every datagram."""

    def __init__(self) -> None:
        self.channels: dict[tuple, SecureChannel] = {}
        self.log: list[tuple[tuple, tuple, bytes]] = []
        self.received: list = []

    def add(self, address: tuple, identity, manifest, **kw) -> SecureChannel:
        def send(data: bytes, to: tuple, frm=address) -> None:
            self.log.append((frm, to, data))
            asyncio.get_running_loop().call_soon(self.deliver, data, frm, to)

        ch = SecureChannel(identity, CertChecker(manifest), send, handshake_timeout=0.5, **kw)
        self.channels[address] = ch
        return ch

    def deliver(self, data: bytes, frm: tuple, to: tuple) -> None:
        got = self.channels[to].receive(data, frm)
        if got is not None and got[1]:
            self.received.append((to, got[1]))


def test_sessions_authenticate_both_ends_and_refuse_replays(tmp_path):
    net = make_network(tmp_path, ["site-a"])
    m = load_manifest(net.manifest)
    a, b = _identity(net.sites["site-a"], m, 0), _identity(net.sites["site-a"], m, 1)

    async def run():
        wire = _Wire()
        node_a = wire.add(("a", 1), a, m)
        node_b = wire.add(("b", 1), b, m)
        client = wire.add(("c", 1), None, m)
        assert await node_a.session_to(("b", 1), expect=a.node_id) is None  # b is not node a: refused
        s = await node_a.session_to(("b", 1), expect=b.node_id)
        assert s is not None and s.peer_id == b.node_id
        assert node_b.certified(a.node_id, ("a", 1))
        anon = await client.session_to(("a", 1))
        assert anon is not None and anon.peer_id == a.node_id
        assert node_a.session_at(("c", 1)) is None  # an anonymous client is no node
        assert await node_a.session_to(("c", 1)) is None  # and never answers a handshake
        node_a.send(s, b"one")
        node_a.send(s, b"two")
        await asyncio.sleep(0.01)
        assert [p for to, p in wire.received if to == ("b", 1)] == [b"one", b"two"]
        sealed = [d for frm, to, d in wire.log if frm == ("a", 1) and to == ("b", 1) and d[0] == 0x56][-2:]
        for d in reversed(sealed):  # replayed, in any order
            wire.deliver(d, ("a", 1), ("b", 1))
        wire.deliver(sealed[0], ("c", 1), ("b", 1))  # from elsewhere
        assert node_b.drops["replay"] == 2 and node_b.drops["unknown_session"] == 1
        assert len([p for to, p in wire.received if to == ("b", 1)]) == 2

    asyncio.run(run())


def test_the_handshake_budget_bounds_public_key_work_per_second(tmp_path):
    """Twenty anonymous initiators at once, with good cookies: only the budget's burst gets the
    responder's X25519 and Ed25519 work; the rest are dropped after one HMAC, and retry later."""
    net = make_network(tmp_path, ["site-a"])
    m = load_manifest(net.manifest)

    async def run():
        wire = _Wire()
        node = wire.add(("n", 1), _identity(net.sites["site-a"], m, 0), m, handshake_rate=4.0)
        clients = [wire.add(("c", i), None, m) for i in range(20)]
        sessions = await asyncio.gather(*(c.session_to(("n", 1)) for c in clients))
        return node, sessions

    node, sessions = asyncio.run(run())
    done = sum(s is not None for s in sessions)
    assert node.drops["handshake_budget"] >= 20 - done
    assert node.handshakes["responder"] == done
    # 4 at once, then 4 a second over the two tries of about a second: far fewer than 20
    assert 4 <= done <= 4 + 4 * 2


def test_a_node_warns_while_its_certificate_runs_out(dht_network, caplog):
    from dht_cluster import start_nodes

    m = load_manifest(dht_network.manifest)
    soon = _identity(dht_network.sites["site-a"], m, 60, days=2)

    async def run():
        (node,) = await start_nodes(dht_network, 1, identities=[soon])
        try:
            with caplog.at_level("WARNING", logger="qis_fhir.dht.node"):
                await node.upkeep()
                await node.upkeep()  # once an hour, not once a pass
        finally:
            node.close()

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if "certificate expires" in r.getMessage()]
    assert len(warnings) == 1 and "expires in 2.0 days" in warnings[0]
