"""What a datagram from an unauthenticated peer may cost a node: constant, small, bounded work.

Every datagram passes :class:`Gate` before anything is parsed. The gate does a handful of dict
operations and comparisons, no parsing, no table scan, no disk:

* size: a request or reply is at least 22 bytes (type byte, 20-byte message id, one msgpack byte)
  and at most the 8,192-byte RPC cap plus that header; anything else is dropped unread;
* a reply (type 1) is read only when its message id is one this node is waiting for (rpcudp's
  ``_outstanding``): ids are 160 random bits used once, so a replayed or forged reply is dropped;
* a request (type 0) spends a token of its source address's bucket (per ``(ip, port)``, a bounded
  map evicting the least recently used), and, unless the address has answered one of our requests
  lately (return-routable) or is certified, a token of one shared bucket for all such strangers, so
  a flood from many spoofed ports cannot take more than that shared rate of real work;
* a request whose message id was seen in the last ``replay_window`` seconds is a replay and dropped.

Counts of what was dropped, by reason, live in memory (``Gate.dropped``): a flood costs no disk.
Measured on the 2 shared cores of this project's machine: about 2 us per dropped datagram in the
gate (see ``docs/dht.md`` for the whole node's CPU under a 20,000-datagram/s flood).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from qis_fhir.dht.keys import RPC_CAP

HEADER = 21  # rpcudp's type byte + 20-byte message id
MIN_DATAGRAM = HEADER + 1
MAX_DATAGRAM = HEADER + RPC_CAP
REQUEST, REPLY = 0, 1


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

    peer_rate: float = 500.0  # requests per second from one (ip, port)
    peer_burst: float = 1000.0
    stranger_rate: float = 1000.0  # requests per second from all not-yet-answered, uncertified sources together
    stranger_burst: float = 2000.0
    max_peers: int = 4096  # buckets kept (per source address)
    answered_ttl: float = 600.0  # an address that answered our request counts as return-routable this long
    max_answered: int = 4096
    replay_window: float = 60.0  # request message ids remembered this long ...
    max_request_ids: int = 65_536  # ... at most this many (about 10 MB; above 1,000 admitted requests a second the window shrinks)


class Gate:
    """Admission of one datagram (see module docstring); ``admit`` returns None or the drop reason."""

    def __init__(self, limits: Limits, *, outstanding: Callable[[bytes], bool], certified: Callable[[tuple], bool]) -> None:
        now = time.monotonic()
        self.limits = limits
        self._outstanding = outstanding
        self._certified = certified
        self._peers = PeerBuckets(limits.peer_rate, limits.peer_burst, limits.max_peers)
        self._strangers = TokenBucket(limits.stranger_rate, limits.stranger_burst, now)
        self._answered = RecentSet(limits.answered_ttl, limits.max_answered)
        self._request_ids = RecentSet(limits.replay_window, limits.max_request_ids)
        self.dropped: Counter[str] = Counter()
        self.admitted = 0  # requests let through
        self.replies = 0  # replies to our requests let through

    def answered(self, address: tuple) -> None:
        """``address`` replied to one of our requests: it is not a spoofed source."""
        self._answered.touch(address[:2], time.monotonic())

    def admit(self, data: bytes, address: tuple) -> str | None:
        reason = self._check(data, address)
        if reason is None:
            if data[0] == REPLY:
                self.replies += 1
            else:
                self.admitted += 1
        else:
            self.dropped[reason] += 1
        return reason

    def _check(self, data: bytes, address: tuple) -> str | None:
        if not MIN_DATAGRAM <= len(data) <= MAX_DATAGRAM:
            return "datagram_size"
        kind = data[0]
        if kind == REPLY:
            return None if self._outstanding(data[1:HEADER]) else "unexpected_reply"
        if kind != REQUEST:
            return "datagram_type"
        now = time.monotonic()
        peer = address[:2]
        if not self._peers.take(peer, now):
            return "peer_rate"
        if peer not in self._answered and not self._certified(peer) and not self._strangers.take(now):
            return "stranger_rate"
        if not self._request_ids.add(data[1:HEADER], now):
            return "replayed_request"
        return None

    def sizes(self) -> dict[str, int]:
        """Entries in each bounded table (what a test of the bounds reads)."""
        return {"peer_buckets": len(self._peers), "answered": len(self._answered), "request_ids": len(self._request_ids)}
