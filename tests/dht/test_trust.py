"""The node's manifest view: newer manifests are picked up, rollbacks refused, revoked keys purged."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from dht_cluster import fingerprint, make_network, sign

from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.storage import PacketStore
from qis_fhir.dht.trust import ManifestVerifier
from qis_fhir.errors import ManifestError
from qis_fhir.packets.codec import decode_packet


def _bump_mtime(path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_revocation_is_picked_up_and_purges_that_sites_packets(tmp_path):
    net = make_network(tmp_path, ["site-p", "site-q"])
    store = PacketStore(tmp_path / "s.sqlite3")
    verifier = ManifestVerifier(net.manifest, replay=store.replay_view(), check_interval=0.0, on_revoked=store.remove_key_ids)
    fp = fingerprint(1)
    for site in net.sites.values():
        wire = sign(site, fp)
        verdict = verifier(wire)
        assert verdict.ok
        store.put(dht_key(fp), verdict.packet, wire, 600)
    net.revoke("site-q")
    _bump_mtime(net.manifest)  # same-second rewrites must still be noticed
    later = sign(net.sites["site-q"], fp, seq=2)
    assert verifier(later).reason == "revoked_key"
    left = [decode_packet(w).site_id for w in store.page(dht_key(fp), None, 8000)[0]]
    assert left == ["site-p"]


def test_an_older_manifest_is_refused_and_a_restart_pins_the_version(tmp_path):
    net = make_network(tmp_path, ["site-p"])
    old = tmp_path / "old-manifest.json"
    shutil.copy(net.manifest, old)
    net.add("site-new", tmp_path / "sites")  # version + 1
    pin = tmp_path / "pin.json"
    verifier = ManifestVerifier(net.manifest, check_interval=0.0, pinned_state=pin)
    newest = verifier.manifest.version
    shutil.copy(old, net.manifest)
    _bump_mtime(net.manifest)
    time.sleep(0.01)
    assert verifier(sign(net.sites["site-new"], fingerprint(2))).ok  # still the newer manifest
    assert verifier.manifest.version == newest
    with pytest.raises(ManifestError):  # a restarted node meets the rolled-back file
        ManifestVerifier(net.manifest, pinned_state=pin)
