"""Test helpers: a network with real site keys and signed packets, and real node processes.

``Cluster`` is the library's ``qis_fhir.dht.cluster.LocalCluster`` (the demo uses it too): node
processes on 127.0.0.1 port 0, stopped by PID in ``Cluster.stop_all``, which fixtures call in their
finalizers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qis_fhir.dht.certs import CertChecker
from qis_fhir.dht.cluster import (
    LOOPBACK,
    CertIssuer,
    Clock,
    LocalCluster,
    certify_nodes,
    round_nodes_in_thread,
    start_round_nodes,
)
from qis_fhir.dht.node import DhtNode, NodeConfig
from qis_fhir.dht.storage import PacketStore
from qis_fhir.dht.trust import ManifestVerifier
from qis_fhir.packets.codec import PacketSigner, encode_packet
from qis_fhir.packets.keys import SiteIdentity, create_site
from qis_fhir.packets.manifest import add_site, create_network, revoke

Cluster = LocalCluster  # the tests' name for it
__all__ = ["LOOPBACK", "Clock", "Cluster", "certify_nodes", "round_nodes_in_thread", "start_round_nodes"]  # what the tests import from here besides the helpers below

REPO = Path(__file__).resolve().parents[2]
BASE_SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]  # tests add (and revoke) more sites later


@contextlib.contextmanager
def joined_cluster(root: Path, manifest: Path, n: int, ksize: int) -> Iterator[Cluster]:
    """``n`` node processes that have all joined; every one stopped by PID on the way out, also on failure."""
    c = Cluster(root, manifest, ksize=ksize)
    try:
        c.start(n)
        c.wait_joined()
        yield c
    finally:
        c.stop_all()


def base_sites(net: TestNetwork) -> list:
    return [net.sites[s] for s in BASE_SITES]


@dataclass
class TestNetwork:
    net_dir: Path
    sites: dict[str, SiteIdentity] = field(default_factory=dict)
    issuer: CertIssuer | None = None  # certifies in-process nodes (an operator site of the network)

    @property
    def manifest(self) -> Path:
        return self.net_dir / "manifest.json"

    def add(self, site_id: str, root: Path) -> SiteIdentity:
        site = create_site(site_id, root / site_id)
        add_site(self.net_dir, root / site_id)
        self.sites[site_id] = site
        return site

    def revoke(self, site_id: str) -> None:
        revoke(self.net_dir, site_id)


async def start_nodes(net: TestNetwork, n: int, *, host: str = LOOPBACK, ksize: int = 3, identities: list | None = None,
                      node_class: type = DhtNode, bootstrap: list | None = None, **cfg) -> list[DhtNode]:
    """``n`` certified nodes in this event loop (in-memory stores), each joining through the first
    (or ``bootstrap``); ``identities`` default to fresh certificates of the network's operator site."""
    nodes: list[DhtNode] = []
    for i in range(n):
        store = PacketStore(":memory:")
        verifier = ManifestVerifier(net.manifest, replay=store.replay_view())
        identity = identities[i] if identities is not None else net.issuer.identity()
        node = node_class(NodeConfig(host=host, ksize=ksize, maintenance_interval=3600, **cfg), verifier, store, identity=identity,
                          checker=CertChecker(lambda v=verifier: v.manifest, refresh=lambda v=verifier: v.refresh(force=True)))
        peers = bootstrap if bootstrap is not None else [(nodes[0].host, nodes[0].port)] if nodes else []
        await node.start(peers)
        nodes.append(node)
    return nodes


def make_network(root: Path, site_ids: list[str], max_nodes_per_site: int = 64) -> TestNetwork:
    net = TestNetwork(root / "net")
    create_network(net.net_dir, network_id="test-net", min_cell_size=11, max_nodes_per_site=max_nodes_per_site)
    net.issuer = CertIssuer(net.manifest, root / "operators")
    for sid in site_ids:
        net.add(sid, root / "sites")
    return net


def fork_network(net: TestNetwork, root: Path) -> TestNetwork:
    """A copy of ``net``'s directory (governance key included) under ``root``: sites added to the copy
    are members for whoever reads the copy, unknown to nodes still watching the original."""
    import shutil

    shutil.copytree(net.net_dir, root / "net")
    return TestNetwork(root / "net", dict(net.sites))


def fingerprint(n: int) -> str:
    """A well-formed, distinct 64-hex fingerprint per n (tests need no cohort behind it)."""
    import hashlib

    return hashlib.sha256(f"test-fingerprint-{n}".encode()).hexdigest()


def sign(site: SiteIdentity, fp: str, *, treatment: str = "TX_A", measure: str = "sbp", period: str = "2024",
         patients: int = 20, seq: int = 1, mean_change: float = -5.0) -> bytes:
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    p = signer.sign(fingerprint=fp, treatment=treatment, measure=measure, period=period, patients=patients,
                    responders=patients // 2, mean_change=mean_change, sd_change=2.5, mapping_version="v1", seq=seq)
    return encode_packet(p)


def tamper(wire: bytes) -> bytes:
    """The same signed packet with one field changed after signing (a canonical encoding, bad signature)."""
    import dataclasses

    from qis_fhir.packets.codec import decode_packet

    p = decode_packet(wire)
    return encode_packet(dataclasses.replace(p, patients=p.patients + 1))


def forge(wire: bytes) -> bytes:
    """The same fields under a signature nobody made."""
    import dataclasses

    from qis_fhir.packets.codec import decode_packet

    p = decode_packet(wire)
    return encode_packet(dataclasses.replace(p, signature=bytes(64)))

