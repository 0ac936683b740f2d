"""SQLite packet storage of one DHT node: many writers per key, survives restarts.

One row per (key, site_id, packet_id). For the same (site, packet id) only the highest sequence number
is kept, so a site's newer packet supersedes its older one; rows are keyed by the *signer's* site id,
which the verifier has checked against the manifest, so no site can overwrite or delete another
site's rows. The ``seen`` table remembers the highest sequence ever accepted per (site, packet id)
even after a row expires, so an old packet cannot be replayed into a node that once held a newer one.

Nothing here verifies: the protocol verifies every packet before calling :meth:`PacketStore.put`.
The :class:`kademlia.storage.IStorage` methods exist so the package's own code paths (``Server.get``,
``set_digest``, ``welcome_if_new``) keep working; ``__setitem__`` refuses anything its injected
verifier rejects.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kademlia.storage import IStorage

from qis_fhir.dht.keys import dht_key
from qis_fhir.packets.newest import supersedes, wire_rank

SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS packets (
    key BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    site_id TEXT NOT NULL,
    packet_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    wire BLOB NOT NULL,
    wire_hash BLOB NOT NULL,
    stored_at REAL NOT NULL,
    last_republished REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, site_id, packet_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS packets_expiry ON packets (expires_at);
CREATE INDEX IF NOT EXISTS packets_republish ON packets (last_republished);
CREATE INDEX IF NOT EXISTS packets_site ON packets (site_id);
CREATE INDEX IF NOT EXISTS packets_site_packet ON packets (site_id, packet_id);
CREATE TABLE IF NOT EXISTS seen (
    site_id TEXT NOT NULL,
    packet_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    digest TEXT,
    PRIMARY KEY (site_id, packet_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
# ``seen`` rows carry when they were last written, so they can expire (added to older data dirs
# with the time of the upgrade: no row loses its replay protection early)
SEEN_NOTED_AT = "ALTER TABLE seen ADD COLUMN noted_at REAL NOT NULL DEFAULT 0"
SEEN_INDEX = "CREATE INDEX IF NOT EXISTS seen_age ON seen (site_id, noted_at, packet_id)"

# outcomes of put()
STORED = "stored"  # new row, or a newer sequence replaced an older one
HELD = "held"  # the identical packet was already held (its expiry may have been extended)
STALE = "stale"  # we hold a newer sequence for this (site, packet id): nothing changed
QUOTA = "site_quota"  # the signing site already has max_rows_per_site rows here: a flood, not data
CONFLICT = "conflict"  # same sequence, different bytes: every replica keeps the lower hash; this one lost
CONFIRMED = frozenset({STORED, HELD})


@dataclass(frozen=True)
class StoredPacket:
    key: bytes
    wire: bytes
    expires_at: float


class ReplayView:
    """The verifier's ``ReplayState`` interface (with ``get_digest``) over the ``seen`` table."""

    def __init__(self, store: PacketStore) -> None:
        self._store = store

    def get(self, site_id: str, packet_id: str) -> int | None:
        row = self._store.seen(site_id, packet_id)
        return None if row is None else row[0]

    def get_digest(self, site_id: str, packet_id: str) -> str | None:
        row = self._store.seen(site_id, packet_id)
        return None if row is None else row[1]

    def put(self, site_id: str, packet_id: str, seq: int, digest: str | None = None) -> None:
        self._store.note_seen(site_id, packet_id, seq, digest)


class PacketStore(IStorage):
    """Packets of one node. ``path`` may be ``":memory:"`` for a short-lived client."""

    def __init__(self, path: str | Path, *, verify: Callable[[bytes], Any] | None = None, max_rows_per_site: int = 100_000,
                 seen_ttl: float = 90 * 86400.0, max_seen_per_site: int | None = None) -> None:
        self.path = str(path)
        self.verify = verify
        # a member site's valid signatures cannot fill a node's disk: new rows past this are refused
        self.max_rows_per_site = max_rows_per_site
        # replay memory of a (site, packet id) whose row is gone is kept this long after its last
        # write (three packet lifetimes: a replay of an older seq after that brings back a packet
        # that had expired anyway), and at most this many rows per site (oldest evicted first)
        self.seen_ttl = seen_ttl
        self.max_seen_per_site = 2 * max_rows_per_site if max_seen_per_site is None else max_seen_per_site
        self._site_rows: dict[str, int] = {}  # cache of rows per site (cleared whenever rows are deleted)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.executescript(SCHEMA)
        if "noted_at" not in {row[1] for row in self.db.execute("PRAGMA table_info(seen)")}:
            with self.transaction():
                self.db.execute(SEEN_NOTED_AT)
                self.db.execute("UPDATE seen SET noted_at = ?", (time.time(),))
        self.db.execute(SEEN_INDEX)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, packet: Any, wire: bytes, ttl: float, now: float | None = None) -> str:
        """Store a *verified* packet under ``key``; returns STORED, HELD, STALE, CONFLICT or QUOTA.

        ``ttl`` seconds from now is when the row expires unless stored again; storing the identical
        packet again extends the expiry (never shortens it) and counts as this node's republish.
        """
        now = time.time() if now is None else now
        expires = now + max(0.0, float(ttl))
        wire_hash = wire_rank(wire)
        row = self.db.execute(
            "SELECT seq, wire_hash, expires_at FROM packets WHERE key=? AND site_id=? AND packet_id=?",
            (key, packet.site_id, packet.packet_id),
        ).fetchone()
        if row is not None:
            old_seq, old_hash, old_expires = row
            if not supersedes(packet.seq, wire_hash, old_seq, old_hash):
                if packet.seq < old_seq:
                    return STALE
                # identical (or the losing side of a same-seq conflict): keep, extend, mark republished
                self.db.execute(
                    "UPDATE packets SET expires_at=?, last_republished=? WHERE key=? AND site_id=? AND packet_id=?",
                    (max(old_expires, expires), now, key, packet.site_id, packet.packet_id),
                )
                return HELD if wire_hash == old_hash else CONFLICT
        elif self.rows_of_site(packet.site_id) >= self.max_rows_per_site:
            return QUOTA
        else:
            self._site_rows[packet.site_id] += 1
        self.db.execute(
            "INSERT OR REPLACE INTO packets (key, fingerprint, site_id, packet_id, key_id, seq, wire, wire_hash,"
            " stored_at, last_republished, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (key, packet.fingerprint, packet.site_id, packet.packet_id, str(packet.key_id), int(packet.seq),
             wire, wire_hash, now, now, expires),
        )
        self.note_seen(packet.site_id, packet.packet_id, int(packet.seq), None)
        return STORED

    def note_seen(self, site_id: str, packet_id: str, seq: int, digest: str | None = None) -> None:
        """Remember the highest seq (and its content digest) accepted for (site, packet id); never moves
        back. Equal seqs follow the shared rule: a known digest replaces an unknown one, the lower of two wins."""
        held = self.seen(site_id, packet_id)
        if held is None or supersedes(int(seq), digest, held[0], held[1]):
            self.db.execute(
                "INSERT OR REPLACE INTO seen (site_id, packet_id, seq, digest, noted_at) VALUES (?,?,?,?,?)",
                (site_id, packet_id, int(seq), digest, time.time()),
            )

    def seen(self, site_id: str, packet_id: str) -> tuple[int, str | None] | None:
        row = self.db.execute("SELECT seq, digest FROM seen WHERE site_id=? AND packet_id=?", (site_id, packet_id)).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def replay_view(self) -> ReplayView:
        return ReplayView(self)

    def count_rejection(self, reason: str, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO rejections (reason, count) VALUES (?, ?)"
            " ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
            (reason, n),
        )

    def rejections(self) -> dict[str, int]:
        return {r: int(c) for r, c in self.db.execute("SELECT reason, count FROM rejections ORDER BY reason")}

    def has_room(self, key: bytes, site_id: str, packet_id: str) -> bool:
        """Whether ``put`` can store this (site, packet id) under ``key``: its row exists (an update)
        or the site is under its quota. Asked before anything is written for a packet, so a refused
        packet costs no disk (not even a ``seen`` row)."""
        if self.rows_of_site(site_id) < self.max_rows_per_site:
            return True
        return self.db.execute(
            "SELECT 1 FROM packets WHERE key=? AND site_id=? AND packet_id=?", (key, site_id, packet_id)
        ).fetchone() is not None

    def expire(self, now: float | None = None) -> int:
        """Delete rows past their expiry, then ``seen`` rows past theirs; returns how many packets went."""
        now = time.time() if now is None else now
        self._site_rows.clear()
        removed = self.db.execute("DELETE FROM packets WHERE expires_at <= ?", (now,)).rowcount
        self.expire_seen(now)
        return removed

    def expire_seen(self, now: float | None = None) -> int:
        """Bound ``seen``: rows older than ``seen_ttl`` whose packet is no longer held go, then each
        site's oldest rows beyond ``max_seen_per_site`` (by write time, then packet id: deterministic).
        A row whose packet is held is never needed for replay protection: the row itself refuses an
        older seq (``put`` answers ``stale``)."""
        now = time.time() if now is None else now
        gone = self.db.execute(
            "DELETE FROM seen WHERE noted_at <= ? AND NOT EXISTS"
            " (SELECT 1 FROM packets p WHERE p.site_id = seen.site_id AND p.packet_id = seen.packet_id)",
            (now - self.seen_ttl,),
        ).rowcount
        over = self.db.execute(
            "SELECT site_id, count(*) - ? FROM seen GROUP BY site_id HAVING count(*) > ?",
            (self.max_seen_per_site, self.max_seen_per_site),
        ).fetchall()
        for site_id, excess in over:
            gone += self.db.execute(
                "DELETE FROM seen WHERE site_id = ? AND packet_id IN"
                " (SELECT packet_id FROM seen WHERE site_id = ? ORDER BY noted_at, packet_id LIMIT ?)",
                (site_id, site_id, int(excess)),
            ).rowcount
        return gone

    def table_sizes(self) -> dict[str, int]:
        """Rows in every table (a full count: for tests and operators, not for peers)."""
        return {t: int(self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in ("packets", "seen", "rejections")}

    def remove_key_ids(self, key_ids: set[str]) -> int:
        """Delete every row signed by one of ``key_ids`` (a manifest revoked them)."""
        removed = 0
        self._site_rows.clear()
        for kid in key_ids:
            removed += self.db.execute("DELETE FROM packets WHERE key_id = ?", (str(kid),)).rowcount
        return removed

    def mark_republished(self, key: bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.db.execute("UPDATE packets SET last_republished=? WHERE key=?", (now, key))

    # ------------------------------------------------------------------ reads
    def count(self, key: bytes | None = None) -> int:
        if key is None:
            return int(self.db.execute("SELECT count(*) FROM packets").fetchone()[0])
        return int(self.db.execute("SELECT count(*) FROM packets WHERE key=?", (key,)).fetchone()[0])

    def rows_of_site(self, site_id: str) -> int:
        if site_id not in self._site_rows:
            self._site_rows[site_id] = int(self.db.execute("SELECT count(*) FROM packets WHERE site_id=?", (site_id,)).fetchone()[0])
        return self._site_rows[site_id]

    def keys(self) -> list[bytes]:
        return [k for (k,) in self.db.execute("SELECT DISTINCT key FROM packets ORDER BY key")]

    def keys_after(self, after: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` distinct keys greater than ``after``, in order (a keyset page: no full scan)."""
        return [k for (k,) in self.db.execute("SELECT DISTINCT key FROM packets WHERE key > ? ORDER BY key LIMIT ?", (after, limit))]

    def key_ids(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT DISTINCT key_id FROM packets")}

    def digest(self, key: bytes) -> tuple[int, bytes]:
        """(count, SHA-256 over the sorted (site, packet id, seq, wire hash) rows) of one key's rows.

        Replicas holding the same set answer with the same digest, so a querier fetches the further
        pages of a large key from one of them instead of from every replica.
        """
        h = hashlib.sha256()
        n = 0
        for site_id, packet_id, seq, wire_hash in self.db.execute(
            "SELECT site_id, packet_id, seq, wire_hash FROM packets WHERE key=? ORDER BY site_id, packet_id", (key,)
        ):
            h.update(f"{site_id}\x00{packet_id}\x00{seq}\x00".encode())
            h.update(wire_hash)
            n += 1
        return n, h.digest()

    def page(self, key: bytes, after: tuple[str, str] | None, budget: int, item_overhead: int = 3) -> tuple[list[bytes], tuple[str, str] | None]:
        """Wires of ``key`` in (site, packet id) order after the cursor ``after``, at most ``budget``
        packed bytes (each wire costs its length plus ``item_overhead`` msgpack framing bytes).

        Returns (wires, next cursor or None when this page reaches the end).
        """
        if after is None:
            rows = self.db.execute(
                "SELECT site_id, packet_id, wire FROM packets WHERE key=? ORDER BY site_id, packet_id", (key,)
            )
        else:
            rows = self.db.execute(
                "SELECT site_id, packet_id, wire FROM packets WHERE key=? AND (site_id > ? OR (site_id = ? AND packet_id > ?))"
                " ORDER BY site_id, packet_id",
                (key, after[0], after[0], after[1]),
            )
        wires: list[bytes] = []
        used = 0
        last: tuple[str, str] | None = None
        for site_id, packet_id, wire in rows:
            cost = len(wire) + item_overhead
            if wires and used + cost > budget:
                return wires, last
            if not wires and cost > budget:
                return wires, after  # cannot even fit one: caller's budget bug, never loops silently
            wires.append(bytes(wire))
            used += cost
            last = (site_id, packet_id)
        return wires, None

    def entries(self, key: bytes, now: float | None = None) -> list[StoredPacket]:
        now = time.time() if now is None else now
        return [
            StoredPacket(key, bytes(w), float(e))
            for w, e in self.db.execute(
                "SELECT wire, expires_at FROM packets WHERE key=? AND expires_at > ? ORDER BY site_id, packet_id", (key, now)
            )
        ]

    def items_to_pass_on(self, key: bytes, now: float | None = None) -> list[list]:
        """``[wire, remaining lifetime]`` store items of ``key``'s live rows: what a holder hands on
        (republish, hand-off), so a replica never makes a packet outlive its origin's publication."""
        now = time.time() if now is None else now
        return [[e.wire, max(0.0, e.expires_at - now)] for e in self.entries(key, now)]

    def keys_due_for_republish(self, interval: float, now: float | None = None) -> list[bytes]:
        """Keys holding a row not (re)stored by anyone for ``interval`` seconds."""
        now = time.time() if now is None else now
        return [
            k
            for (k,) in self.db.execute(
                "SELECT DISTINCT key FROM packets WHERE last_republished <= ? AND expires_at > ? ORDER BY key",
                (now - interval, now),
            )
        ]

    # ------------------------------------------------------------------ IStorage (the package's view)
    def __setitem__(self, key: bytes, value: bytes) -> None:
        if self.verify is None or not isinstance(value, (bytes, bytearray)):
            raise TypeError("PacketStore holds only verified packet wire bytes")
        verdict = self.verify(bytes(value))
        if not verdict.ok:
            raise ValueError(f"packet rejected: {verdict.reason}")
        if dht_key(verdict.packet.fingerprint) != key:
            raise ValueError("packet rejected: wrong_key")
        self.put(key, verdict.packet, bytes(value), ttl=7 * 86400)

    def __getitem__(self, key: bytes) -> bytes:
        row = self.db.execute(
            "SELECT wire FROM packets WHERE key=? ORDER BY stored_at DESC, site_id, packet_id LIMIT 1", (key,)
        ).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def get(self, key: bytes, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        cutoff = time.time() - seconds_old
        return [
            (k, bytes(w))
            for k, w in self.db.execute(
                "SELECT key, wire FROM packets WHERE last_republished <= ? ORDER BY key", (cutoff,)
            )
        ]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter([(k, bytes(w)) for k, w in self.db.execute("SELECT key, wire FROM packets ORDER BY key")])

    # ------------------------------------------------------------------ transactions
    def transaction(self) -> _Transaction:
        """``with store.transaction():`` groups the writes of one RPC into one commit."""
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
