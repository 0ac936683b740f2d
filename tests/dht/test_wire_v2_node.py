"""A version-2 packet (control cell) through real node processes: stored beside version 1, served back intact."""

from __future__ import annotations

import pytest
from dht_cluster import LOOPBACK, Cluster, fingerprint, sign

from qis_fhir.dht.client import publish, query
from qis_fhir.packets.codec import PacketSigner, decode_packet, encode_packet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_v2_packet_is_stored_and_served_by_a_real_node_beside_v1(dht_network, tmp_path):
    site = dht_network.sites["site-a"]
    fp = fingerprint(7002)
    signer = PacketSigner(site.private_key, site.site_id, site.key_id)
    v2 = encode_packet(signer.sign(fingerprint=fp, treatment="TX_NONE", measure="bp_control", period="2023", patients=40,
                                   responders=9, mean_change=141.25, sd_change=12.5, mapping_version="v1", seq=1, measured=33))
    v1 = sign(site, fp, treatment="TX_A")
    cluster = Cluster(tmp_path / "nodes", dht_network.manifest, ksize=3)
    try:
        cluster.start(3)
        cluster.wait_joined()
        report = publish([v1, v2], [cluster.nodes[0].address], dht_network.manifest, ksize=3, bind=LOOPBACK)
        assert report.confirmed == 2 and report.min_replicas >= 2, report.to_dict()
        got = query(fp, [cluster.nodes[2].address], dht_network.manifest, ksize=3, bind=LOOPBACK)
    finally:
        cluster.stop_all()
    assert got.rejected == {}
    assert sorted(got.wires) == sorted([v1, v2])  # byte for byte: every node stored what was signed
    by_version = {decode_packet(w).wire_version: decode_packet(w) for w in got.wires}
    assert by_version[2].measured == 33 and by_version[1].measured is None
