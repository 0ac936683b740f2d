"""The bounded pieces on their own: the log rate limit, the gate's tables, the hand-off rule, the
expiry and cap of ``seen`` (and its migration)."""

from __future__ import annotations

import io
import logging
import random
import sqlite3

from dht_cluster import fingerprint, sign

from qis_fhir.dht.handoff import should_hand_off
from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.limits import Gate, Limits, PeerBuckets, RecentSet
from qis_fhir.dht.logs import RateLimit, route_to, write_summaries
from qis_fhir.dht.session import COOKIE, DATA, HELLO, INIT, MAX_DATAGRAM, MIN_DATAGRAM, RESP
from qis_fhir.dht.storage import PacketStore
from qis_fhir.packets.codec import decode_packet


def test_library_warnings_are_limited_per_reason_stripped_of_what_the_peer_sent_and_counted():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in ("qis_fhir", "rpcudp", "kademlia")}
    try:
        route_to(handler, logging.INFO, limit=RateLimit(interval=3600))
        lib = logging.getLogger("rpcudp.protocol")
        for i in range(10_000):
            lib.warning("received datagram too small from %s, ignoring", ("10.9.8.7", 4000 + i))
            lib.warning("%s has no callable method rpc_%s; ignoring request", "PacketProtocol", "MRN4711_Jane_Doe")
        ours = logging.getLogger("qis_fhir.dht.protocol")
        for reason in ("bad_signature", "site_quota") * 50:
            ours.info("rejected %d item(s): %s", 1, reason, extra={"log_reason": reason})
        assert write_summaries() == 1
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).propagate = propagate
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["received datagram too small from ?, ignoring", "? has no callable method rpc_?; ignoring request"]
    assert lines[2:4] == ["rejected 1 item(s): bad_signature", "rejected 1 item(s): site_quota"]  # one line per reason
    assert len(lines) == 5
    assert "suppressed 20096 repeated log lines" in lines[4] and "9999 x rpcudp.protocol" in lines[4] and "49 x" in lines[4]
    assert "10.9.8.7" not in out.getvalue() and "MRN4711" not in out.getvalue()


def _gate(known=lambda peer: False, **limits) -> Gate:
    return Gate(Limits(**limits), min_size=MIN_DATAGRAM, max_size=MAX_DATAGRAM,
                replies=frozenset({COOKIE, RESP}), openers=frozenset({HELLO, INIT}), known=known)


def test_gate_tables_stay_bounded_and_rates_hold_per_peer_and_for_all_strangers():
    gate = _gate(peer_rate=0.01, peer_burst=10, stranger_rate=0.01, stranger_burst=50, max_peers=100, max_answered=10)
    hello = bytes([HELLO]) + bytes(127)

    # one peer: its burst of 10, then refused
    verdicts = [gate.admit(hello, ("10.0.0.1", 1)) for i in range(30)]
    assert verdicts.count(None) == 10 and set(verdicts[10:]) == {"peer_rate"}
    # 5,000 peers (spoofed ports): the shared stranger bucket admits 50 - 10 more, the tables stay bounded
    verdicts = [gate.admit(hello, ("10.0.0.2", i)) for i in range(5000)]
    assert verdicts.count(None) == 40 and set(v for v in verdicts if v) == {"stranger_rate"}
    assert gate.sizes()["peer_buckets"] == 100
    # sealed datagrams and answers to our own handshakes never pay the shared bucket
    data = bytes([DATA]) + bytes(40)
    assert gate.admit(data, ("10.0.0.4", 1)) is None and gate.admit(bytes([COOKIE]) + bytes(20), ("10.0.0.5", 1)) is None
    # an address with a live session is no stranger
    for port in range(20):
        gate.answered(("10.0.0.3", port))
    assert gate.sizes()["answered"] == 10
    assert gate.admit(hello, ("10.0.0.3", 19)) is None and gate.admit(hello, ("10.0.0.3", 0)) == "stranger_rate"
    assert _gate(known=lambda peer: peer == ("10.0.0.6", 1), stranger_burst=0).admit(hello, ("10.0.0.6", 1)) is None
    # sizes outside the wire's are dropped unread
    assert gate.admit(bytes([COOKIE]) + bytes(19), ("10.0.0.3", 19)) == "datagram_size"
    assert gate.admit(bytes([DATA]) + bytes(MAX_DATAGRAM), ("10.0.0.3", 19)) == "datagram_size"


def test_a_refunded_token_lets_responses_to_our_own_calls_through_a_spent_bucket():
    gate = _gate(peer_rate=0.01, peer_burst=2)
    data, peer = bytes([DATA]) + bytes(40), ("10.0.0.7", 1)
    assert [gate.admit(data, peer) for _ in range(3)] == [None, None, "peer_rate"]
    gate.refund(peer)  # the second one opened as a response to our call
    assert gate.admit(data, peer) is None and gate.admit(data, peer) == "peer_rate"


def test_peer_buckets_and_recent_set_evict_the_oldest():
    buckets = PeerBuckets(rate=1, burst=1, max_peers=3)
    for peer in "abcd":
        assert buckets.take(peer, 0.0)
    assert len(buckets) == 3 and buckets.take("a", 0.0)  # "a" was evicted: back with a full bucket
    recent = RecentSet(ttl=10, cap=3)
    assert all(recent.add(k, 0.0) for k in "abc") and not recent.add("a", 1.0)
    assert recent.add("d", 2.0) and len(recent) == 3 and recent.add("a", 3.0)  # cap evicted "a"
    assert recent.add("b", 20.0) and len(recent) == 1  # everything older than ttl went


def test_hand_off_rule_matches_the_exact_sort_it_replaces():
    rng = random.Random(7)
    for _ in range(300):
        k = rng.choice([2, 3, 8])
        me, newcomer, key = (rng.getrandbits(160) for _ in range(3))
        contacts = [rng.getrandbits(160) for _ in range(rng.randrange(0, 12))]
        # the inline check this replaces: sort all contacts by distance to the key, take k
        neighbours = sorted(contacts, key=lambda c: c ^ key)[:k]
        expected = not neighbours or (
            (len(neighbours) < k or newcomer ^ key < neighbours[-1] ^ key) and me ^ key < neighbours[0] ^ key
        )
        assert should_hand_off(key, newcomer, me, contacts, k) == expected


def test_seen_expires_after_its_ttl_unless_the_packet_is_held_and_is_capped_per_site(dht_network, tmp_path):
    site = dht_network.sites["site-a"]
    store = PacketStore(tmp_path / "s.sqlite3", seen_ttl=100.0, max_seen_per_site=3)
    held = sign(site, fingerprint(1))
    p = decode_packet(held)
    store.put(dht_key(p.fingerprint), p, held, 3600.0, now=0.0)
    for i in range(5):  # remembered only: their packets expired or went elsewhere
        store.note_seen("site-a", f"gone-{i}", 1)
    store.db.execute("UPDATE seen SET noted_at = 0")
    store.db.execute("UPDATE seen SET noted_at = 50 WHERE packet_id IN ('gone-3', 'gone-4')")
    assert store.expire_seen(now=120.0) == 3  # older than the ttl and not held: gone
    assert {r for (r,) in store.db.execute("SELECT packet_id FROM seen")} == {p.packet_id, "gone-3", "gone-4"}
    for i in range(5, 8):
        store.note_seen("site-a", f"gone-{i}", 1)
    store.expire_seen(now=120.0)  # 6 rows, cap 3: the oldest three by (noted_at, packet id) go
    assert {r for (r,) in store.db.execute("SELECT packet_id FROM seen")} == {"gone-5", "gone-6", "gone-7"}
    store.close()


def test_a_data_dir_from_before_seen_expired_keeps_its_rows_protected(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE seen (site_id TEXT NOT NULL, packet_id TEXT NOT NULL, seq INTEGER NOT NULL,"
                     " digest TEXT, PRIMARY KEY (site_id, packet_id)) WITHOUT ROWID;"
                     "INSERT INTO seen VALUES ('site-a', 'p1', 4, NULL);")
    db.commit()
    db.close()
    store = PacketStore(path)
    assert store.seen("site-a", "p1") == (4, None)
    assert store.expire_seen() == 0  # stamped with the upgrade time, not 0: nothing expires at once
    store.close()


def test_the_command_line_leaves_the_handlers_of_a_host_process_alone(caplog, tmp_path):
    """Run in process (Dagster, a test runner), the CLI must not rate-limit its host's handlers: a second
    identical line within the second is the host's to keep (a release test once lost its log line)."""
    import pytest

    from qis_fhir.cli import main

    with pytest.raises(SystemExit):
        main(["keys", "new", "--site-id", "s1", "--out", str(tmp_path / "s1")])
    log = logging.getLogger("qis_fhir.host")
    for _ in range(3):
        log.warning("the same line")
    assert caplog.text.count("the same line") == 3
    assert not any(isinstance(f, RateLimit) for h in logging.getLogger().handlers for f in h.filters)
