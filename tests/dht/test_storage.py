"""PacketStore: many writers per key, newest seq per (site, packet id), persistence, paging, expiry."""

from __future__ import annotations

import time

from dht_cluster import base_sites, fingerprint, sign

from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.storage import CONFLICT, HELD, QUOTA, STALE, STORED, PacketStore
from qis_fhir.packets.codec import decode_packet
from qis_fhir.packets.manifest import load_manifest
from qis_fhir.packets.verifier import Verifier


def _put(store: PacketStore, wire: bytes, ttl: float = 3600.0, now: float | None = None) -> str:
    p = decode_packet(wire)
    return store.put(dht_key(p.fingerprint), p, wire, ttl, now)


def test_every_site_is_kept_under_one_key_and_newer_seq_supersedes_only_its_own(dht_network, tmp_path):
    fp = fingerprint(1)
    store = PacketStore(tmp_path / "s.sqlite3")
    a, b = dht_network.sites["site-a"], dht_network.sites["site-b"]
    assert _put(store, sign(a, fp, seq=1)) == STORED
    assert _put(store, sign(b, fp, seq=1)) == STORED
    assert _put(store, sign(b, fp, seq=1)) == HELD  # re-delivery: not a second row
    assert store.count(dht_key(fp)) == 2
    newer = sign(a, fp, seq=2, mean_change=-7.0)
    assert _put(store, newer) == STORED
    assert _put(store, sign(a, fp, seq=1)) == STALE  # an older seq never comes back
    wires, nxt = store.page(dht_key(fp), None, 8000)
    assert nxt is None
    held = sorted((decode_packet(w).site_id, decode_packet(w).seq) for w in wires)
    assert held == [("site-a", 2), ("site-b", 1)]  # b's row untouched by a's update


def test_same_seq_conflict_converges_on_lowest_hash(dht_network, tmp_path):
    fp = fingerprint(2)
    a = dht_network.sites["site-a"]
    w1, w2 = sign(a, fp, seq=5, mean_change=-1.0), sign(a, fp, seq=5, mean_change=-2.0)
    import hashlib

    low, high = sorted([w1, w2], key=lambda w: hashlib.sha256(w).digest())
    s1, s2 = PacketStore(":memory:"), PacketStore(":memory:")
    _put(s1, low), _put(s2, high)
    assert _put(s1, high) == CONFLICT
    assert _put(s2, low) == STORED
    assert s1.page(dht_key(fp), None, 8000)[0] == s2.page(dht_key(fp), None, 8000)[0] == [low]


def test_store_survives_reopen_and_remembers_replays_after_expiry(dht_network, tmp_path):
    fp = fingerprint(3)
    path = tmp_path / "s.sqlite3"
    store = PacketStore(path)
    a = dht_network.sites["site-a"]
    now = time.time()
    _put(store, sign(a, fp, seq=3), ttl=10, now=now)
    store.close()
    store = PacketStore(path)
    assert store.count() == 1
    assert store.expire(now + 11) == 1
    assert store.count() == 0
    verify = Verifier(load_manifest(dht_network.manifest), replay=store.replay_view()).verify
    verdict = verify(sign(a, fp, seq=2))
    assert not verdict.ok and verdict.reason == "replay"  # the seen table outlives the row


def test_pages_walk_every_row_once_under_the_budget(dht_network, tmp_path):
    fp = fingerprint(4)
    store = PacketStore(tmp_path / "s.sqlite3")
    for site in base_sites(dht_network):
        for t in range(12):
            _put(store, sign(site, fp, treatment=f"TX_T{t}"))
    key = dht_key(fp)
    seen, cursor, pages = [], None, 0
    while True:
        wires, cursor = store.page(key, cursor, 2000)
        assert sum(len(w) + 3 for w in wires) <= 2000
        seen.extend(wires)
        pages += 1
        if cursor is None:
            break
    assert pages > 1
    assert len(seen) == len(set(seen)) == 60


def test_republish_due_and_expiry_extension(dht_network, tmp_path):
    fp = fingerprint(5)
    store = PacketStore(tmp_path / "s.sqlite3")
    a = dht_network.sites["site-a"]
    now = time.time()
    wire = sign(a, fp)
    _put(store, wire, ttl=100, now=now - 50)
    assert store.keys_due_for_republish(30, now) == [dht_key(fp)]
    _put(store, wire, ttl=1000, now=now)  # someone else re-stored it: counts as republished, expiry extended
    assert store.keys_due_for_republish(30, now) == []
    assert store.entries(dht_key(fp), now)[0].expires_at == now + 1000


def test_revoked_keys_are_purged(dht_network, tmp_path):
    fp = fingerprint(6)
    store = PacketStore(tmp_path / "s.sqlite3")
    a, b = dht_network.sites["site-a"], dht_network.sites["site-b"]
    _put(store, sign(a, fp)), _put(store, sign(b, fp))
    assert store.remove_key_ids({a.key_id}) == 1
    assert [decode_packet(w).site_id for w in store.page(dht_key(fp), None, 8000)[0]] == ["site-b"]


def test_one_site_cannot_fill_a_node_but_others_still_store(dht_network, tmp_path):
    store = PacketStore(tmp_path / "s.sqlite3", max_rows_per_site=3)
    a, b = base_sites(dht_network)[:2]
    outcomes = [_put(store, sign(a, fingerprint(20 + i))) for i in range(5)]
    assert outcomes == [STORED, STORED, STORED, QUOTA, QUOTA]
    assert _put(store, sign(a, fingerprint(20), seq=2)) == STORED  # its existing rows still update
    assert _put(store, sign(b, fingerprint(20))) == STORED
