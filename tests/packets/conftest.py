"""A small network for packet tests: two member sites, one revoked site, one outsider key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.packets.codec import encode_packet, sign_packet
from qis_fhir.packets.keys import create_site, key_id_of, raw_public, read_private_key
from qis_fhir.packets.manifest import add_site, create_network, load_network, revoke
from qis_fhir.packets.model import Packet


@dataclasses.dataclass
class Net:
    root: Path
    net_dir: Path
    site_a: object
    site_b: object
    site_revoked: object
    governance_key: Ed25519PrivateKey
    network: object  # NetworkContext

    @property
    def manifest(self):
        return self.network.manifest

    def packet(self, site=None, **overrides) -> Packet:
        """An honest signed packet from ``site`` (default site A), with fields overridable before signing."""
        site = site or self.site_a
        fields = dict(
            fingerprint="ab" * 32,
            treatment="TX_0001",
            measure="hba1c",
            period="2024",
            patients=25,
            responders=10,
            mean_change=-0.75,
            sd_change=1.125,
            mapping_version="v1",
            site_id=site.site_id,
            key_id=site.key_id,
            seq=20240105,
        )
        fields.update(overrides)
        key = overrides.pop("_key", None)
        fields.pop("_key", None)
        return sign_packet(Packet(**fields), key or site.private_key)

    def wire(self, site=None, **overrides) -> bytes:
        return encode_packet(self.packet(site, **overrides))


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Net:
    root = tmp_path_factory.mktemp("net")
    create_network(root / "net", network_id="test-net", min_cell_size=11)
    site_a = create_site("site-a", root / "a")
    site_b = create_site("site-b", root / "b")
    site_r = create_site("site-r", root / "r")
    for s in ("a", "b", "r"):
        add_site(root / "net", root / s)
    revoke(root / "net", "site-r")
    gov = read_private_key(root / "net" / "governance_key.pem")
    return Net(root, root / "net", site_a, site_b, site_r, gov, load_network(root / "net"))


@pytest.fixture(scope="module")
def outsider() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    return key, key_id_of(raw_public(key.public_key()))
