"""A real network for the evidence tests: governance key, secret, manifest (minimum cell size 11),
three member sites and one that governance will revoke; packets signed for real cohort fingerprints."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dht"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dht_cluster import TestNetwork, make_network  # noqa: E402

from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping  # noqa: E402
from qis_fhir.packets.codec import PacketSigner, encode_packet  # noqa: E402
from qis_fhir.packets.manifest import load_network  # noqa: E402
from qis_fhir.privacy.fingerprint import Fingerprinter  # noqa: E402

SITES = ["site-a", "site-b", "site-c", "site-r"]


@dataclass
class EvidenceNet:
    net: TestNetwork
    mapping: object

    @cached_property
    def context(self):
        return load_network(self.net.net_dir)

    def fp(self, bucket: str, age_band: str, sex: str) -> str:
        return Fingerprinter(self.context.secret, self.mapping.version)(bucket, age_band, sex)

    def wire(self, site_id: str, cohort: tuple[str, str, str], *, treatment: str = "TX_0001", measure: str = "systolic_bp",
             period: str = "2024", patients: int = 20, responders: int = 8, mean: float = -6.5, sd: float = 9.25,
             seq: int = 20241201) -> bytes:
        site = self.net.sites[site_id]
        signer = PacketSigner(site.private_key, site.site_id, site.key_id)
        return encode_packet(signer.sign(fingerprint=self.fp(*cohort), treatment=treatment, measure=measure, period=period,
                                         patients=patients, responders=responders, mean_change=mean, sd_change=sd,
                                         mapping_version=self.mapping.version, seq=seq))

    def revoked_copy(self, dest: Path) -> Path:
        """The network folder as a member holds it after governance revoked site-r (nodes may lag)."""
        from qis_fhir.packets.manifest import revoke

        shutil.copytree(self.net.net_dir, dest)
        revoke(dest, "site-r")
        return dest


@pytest.fixture(scope="module")
def enet(tmp_path_factory) -> EvidenceNet:
    return EvidenceNet(make_network(tmp_path_factory.mktemp("evnet"), SITES), load_mapping(MAPPINGS_ROOT / "v1"))  # its packets say v1

