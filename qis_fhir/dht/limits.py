"""What a datagram from an unauthenticated peer may cost a node: constant, small, bounded work.

Every datagram passes :class:`Gate` before anything else, before the authenticated wire of
``qis_fhir.dht.session`` spends a cookie HMAC, a handshake or an AEAD open on it. The gate does a
handful of dict operations and comparisons, no parsing, no crypto, no table scan, no disk:

* size: anything shorter than the wire's shortest message (a 21-byte COOKIE) or longer than a sealed
  RPC at the 8,192-byte cap is dropped unread;
* every datagram except an answer to a handshake this node started (COOKIE, RESP: the channel
  drops unsolicited ones after one dict lookup) spends a token of its source address's bucket (per
  ``(ip, port)``, a bounded map evicting the least recently used); a sealed response to one of our
  own requests gets its token back once opened (:meth:`Gate.refund`), so the bucket paces what a
  peer asks of us, not what we asked of it;
* a handshake opener (HELLO, INIT) from an address without a live session, one that has not
  completed a cookie exchange lately, also spends a token of one shared bucket for all such
  strangers, so a flood from many spoofed ports cannot take more than that shared rate of real work.

What the sealed wire made redundant is gone from here: replayed message ids (a sealed datagram
carries a counter checked against its session's replay window) and replies to no request of ours
(a response is matched to the call it answers, on the session that call went out on).

Counts of what was dropped, by reason, live in memory (``Gate.dropped``): a flood costs no disk.
Measured on the 2 shared cores of this project's machine: about 2 us per dropped datagram in the
gate (see ``docs/dht.md`` for the whole node's CPU under a 20,000-datagram/s flood).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class PeerBuckets:
    """One :class:`TokenBucket` per key, at most ``max_peers`` of them (least recently used evicted).

    An evicted peer comes back with a full bucket, so the bound caps memory, not any one peer's
    rate: a flood from more distinct sources than ``max_peers`` is held by the shared bucket instead.
    """

    def __init__(self, rate: float, burst: float, max_peers: int) -> None:
        self.rate, self.burst, self.max_peers = rate, burst, max_peers
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def refund(self, key: Hashable) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + 1.0)

    def __len__(self) -> int:
        return len(self._buckets)


class RecentSet:
    """Keys seen in the last ``ttl`` seconds, at most ``cap`` of them (oldest evicted first)."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl, self.cap = ttl, cap
        self._seen: OrderedDict[Hashable, float] = OrderedDict()

    def add(self, key: Hashable, now: float) -> bool:
        """Remember ``key``; False when it was already there (within ``ttl``)."""
        seen = self._seen
        while seen:  # drop what has aged out, oldest first: amortised O(1)
            oldest, at = next(iter(seen.items()))
            if now - at < self.ttl:
                break
            del seen[oldest]
        if key in seen:
            return False
        seen[key] = now
        if len(seen) > self.cap:
            seen.popitem(last=False)
        return True

    def touch(self, key: Hashable, now: float) -> None:
        self._seen.pop(key, None)
        self.add(key, now)

    def __contains__(self, key: Hashable) -> bool:
        at = self._seen.get(key)
        return at is not None and time.monotonic() - at < self.ttl

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class Limits:
    """Rates are datagrams per second. Defaults sized so honest traffic never meets them: a node
    answers a publishing client's store batches (32 in flight) at a few hundred per second."""

    peer_rate: float = 500.0  # datagrams per second from one (ip, port), our own calls' responses refunded
    peer_burst: float = 1000.0
    stranger_rate: float = 1000.0  # handshake openers per second from all addresses without a live session together
    stranger_burst: float = 2000.0
    max_peers: int = 4096  # buckets kept (per source address)
    answered_ttl: float = 600.0  # an address with a live session counts as return-routable this long
    max_answered: int = 4096


class Gate:
    """Admission of one datagram (see module docstring); ``admit`` returns None or the drop reason.

    The wire's facts come from its owner (``qis_fhir.dht.session``): the size range, the type bytes
    of ``replies`` (answers to our own handshakes) and of ``openers`` (what a stranger sends first);
    ``known(address)`` is whether a certified peer has a live session there."""

    def __init__(
        self,
        limits: Limits,
        *,
        min_size: int,
        max_size: int,
        replies: frozenset[int],
        openers: frozenset[int],
        known: Callable[[tuple], bool],
    ) -> None:
        now = time.monotonic()
        self.limits = limits
        self.min_size, self.max_size = min_size, max_size
        self._replies, self._openers = replies, openers
        self._known = known
        self._peers = PeerBuckets(limits.peer_rate, limits.peer_burst, limits.max_peers)
        self._strangers = TokenBucket(limits.stranger_rate, limits.stranger_burst, now)
        self._answered = RecentSet(limits.answered_ttl, limits.max_answered)
        self.dropped: Counter[str] = Counter()
        self.admitted = 0  # datagrams let through to the channel

    def answered(self, address: tuple) -> None:
        """``address`` sent an authentic datagram of a live session: it is not a spoofed source."""
        self._answered.touch(address[:2], time.monotonic())

    def refund(self, address: tuple) -> None:
        """Give back the token a response to one of our own requests spent."""
        self._peers.refund(address[:2])

    def admit(self, data: bytes, address: tuple) -> str | None:
        reason = self._check(data, address)
        if reason is None:
            self.admitted += 1
        else:
            self.dropped[reason] += 1
        return reason

    def _check(self, data: bytes, address: tuple) -> str | None:
        if not self.min_size <= len(data) <= self.max_size:
            return "datagram_size"
        kind = data[0]
        if kind in self._replies:
            return None
        now = time.monotonic()
        peer = address[:2]
        if not self._peers.take(peer, now):
            return "peer_rate"
        if kind in self._openers and peer not in self._answered and not self._known(peer) and not self._strangers.take(now):
            return "stranger_rate"
        return None

    def sizes(self) -> dict[str, int]:
        """Entries in each bounded table (what a test of the bounds reads)."""
        return {"peer_buckets": len(self._peers), "answered": len(self._answered)}
