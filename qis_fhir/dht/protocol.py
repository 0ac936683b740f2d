"""The hardened Kademlia protocol: verify on arrival, many packets per key, pages under the RPC cap.

Subclasses the package's :class:`kademlia.protocol.KademliaProtocol` and keeps its RPCs working
(``ping``, ``find_node``, and ``store``/``find_value`` for a stock client), with these changes:

* every packet that arrives (``store_packets``, the stock ``store``, hand-offs, republishes) is verified
  with the injected verifier (signature, trust registry, revocation, replay, size) and must belong to
  the key it is stored under; rejections are counted by reason and never stored, so never forwarded;
* ``find_packets(key, cursor)`` answers one page of a key's packets that fits the 8,192-byte cap,
  the key's count and content digest, a cursor for the next page, and (on the first page) the
  2k closest nodes it knows (IPv4 ones packed as 26-byte records in ``n4``), so one RPC both routes
  a lookup and returns data;
* outgoing RPCs go through a semaphore (bounded in-flight requests) with one retry, so a burst of
  thousands of packets queues instead of overflowing UDP receive buffers into 5-second timeouts;
* a peer that sends an empty node id is a short-lived *client*: answered, but never put in the
  routing table (dead clients would otherwise cost every later lookup a timeout);
* a newly seen node is handed the packets it should hold, with their remaining lifetime, under the
  right keys (the stock ``welcome_if_new`` re-hashes keys and sends them under wrong ids), through a
  bounded, paced queue (``qis_fhir.dht.handoff``), never inline;
* every datagram passes two layers before anything is parsed: first the gate of
  ``qis_fhir.dht.limits`` (size, a token bucket per source address, and one shared bucket that
  handshake openers from addresses without a live session pay), then a
  :class:`~qis_fhir.dht.session.SecureChannel` (a handshake per peer behind a stateless cookie, then
  sealed datagrams with a replay window): rpcudp-style framing never sees a byte an outsider sent, a
  response counts only from the session its request went out on, and only a peer that proved a node
  certificate for its id enters the routing table, counts as a contact, receives hand-offs or signs
  store receipts; ``stats`` answers operators' addresses and certified peers only; counts of
  refusals stay in memory and reach SQLite once per upkeep pass.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from rpcudp.exceptions import MalformedMessage

from qis_fhir.dht.certs import CertChecker, NodeIdentity
from qis_fhir.dht.handoff import HandOff
from qis_fhir.dht.keys import RPC_CAP, dht_key, pack_batches, pack_nodes, packed_size
from qis_fhir.dht.limits import Gate, Limits
from qis_fhir.dht.lookup import REPLY_NODES_PER_K, closest_to
from qis_fhir.dht.receipts import receipt_valid, sign_receipt
from qis_fhir.dht.session import COOKIE, HELLO, INIT, MAX_DATAGRAM, MIN_DATAGRAM, RESP, SecureChannel, Session
from qis_fhir.dht.storage import CONFIRMED, QUOTA, PacketStore

log = logging.getLogger("qis_fhir.dht.protocol")

MAX_ITEMS_PER_STORE = 64
MAX_CURSOR_FIELD = 128
CURSOR_RESERVE = 2 * MAX_CURSOR_FIELD + 8  # packed [site_id, packet_id] at their longest
RECV_BUFFER = 4 * 1024 * 1024
DRAIN_BATCH = 64  # datagrams read per event-loop turn
OPERATORS = ("127.0.0.1", "::1")  # addresses whose stats requests are answered, by default
STATS_CACHE = 1.0  # seconds a stats answer is reused: its counts scan whole tables
MAX_ADDRESSES = 8192  # addresses whose last id is remembered (beyond a full routing table's worth)
NO_REPLY = object()  # what a handler returns to send nothing back
TRIPLE_MAX = 66  # packed [20-byte id, IPv6 address text, port] at its longest
TRIPLE_MAX_V4 = 42  # ... with an IPv4 address

Verify = Callable[[bytes], Any]  # -> Verdict(ok, reason, packet)


def _valid_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 20


class Peer(tuple):
    """Who sent an RPC: its (host, port), as rpcudp passes senders, and the session it came in on;
    ``node_id`` is the certified node id, None for an anonymous client."""

    session: Session

    def __new__(cls, address: tuple, session: Session) -> Peer:
        peer = super().__new__(cls, address[:2])
        peer.session = session
        return peer

    @property
    def node_id(self) -> bytes | None:
        return self.session.peer_id


def valid_cursor(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) and len(v) <= MAX_CURSOR_FIELD for v in value)
    )


class IndexedRoutingTable(RoutingTable):
    """The stock table, with the bucket of an id found by bisection instead of a linear walk: with
    hundreds of buckets (small k, many ids) the walk cost about 115 us per lookup, several per new id."""

    def get_bucket_for(self, node: Node) -> int | None:
        if getattr(self, "_bounds_of", None) != len(self.buckets):  # buckets only ever split: count changes
            self._bounds = [b.range[1] for b in self.buckets]
            self._bounds_of = len(self.buckets)
        index = bisect.bisect_right(self._bounds, node.long_id)
        return index if index < len(self.buckets) else None


class PacketProtocol(KademliaProtocol):
    def __init__(
        self,
        source_node: Node,
        storage: PacketStore,
        ksize: int,
        *,
        verify: Verify,
        announce: bool = True,
        rpc_timeout: float = 3.0,
        retries: int = 1,
        max_inflight: int = 32,
        max_ttl: float = 30 * 86400,
        limits: Limits | None = None,
        operators: tuple[str, ...] = OPERATORS,
        identity: NodeIdentity | None = None,
        checker: CertChecker,
        handshake_rate: float = 200.0,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.identity = identity
        # channel drops are counted there and summed into one log line per upkeep pass (log_dropped)
        self.channel = SecureChannel(
            identity, checker, lambda data, address: self.transport.sendto(data, address),
            handshake_rate=handshake_rate, handshake_timeout=rpc_timeout,
        )
        self._calls: dict[bytes, tuple[asyncio.Future, Session]] = {}
        self.router = IndexedRoutingTable(self, ksize, source_node)
        self._reader: socket.socket | None = None
        self._wait_timeout = rpc_timeout
        self.verify = verify
        self.announce = announce
        self.retries = retries
        self.max_ttl = max_ttl
        self._slots = asyncio.Semaphore(max_inflight)
        self.rejections: Counter[str] = Counter()
        self.rpc_sent = 0
        self.rpc_failed = 0
        self._tasks: set[asyncio.Task] = set()
        self._unsaved: Counter[str] = Counter()  # rejections not yet added to the SQLite table
        self.operators = frozenset(operators)
        self.gate = Gate(
            limits or Limits(), min_size=MIN_DATAGRAM, max_size=MAX_DATAGRAM,
            replies=frozenset({COOKIE, RESP}), openers=frozenset({HELLO, INIT}),
            known=lambda address: self.channel.session_at(address) is not None,
        )
        self.handoff = HandOff(storage, source_node, self.contacts, ksize, self.send_packets, still_known=self.knows)
        self._id_at: OrderedDict[tuple, bytes] = OrderedDict()  # the id last seen at each contact address
        self._stats: tuple[float, dict] | None = None
        self._dropped_logged: Counter[str] = Counter()
        self._pings: dict[tuple, asyncio.Future] = {}  # pings in flight, by contact

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a bigger receive buffer absorbs bursts of replies (capped by net.core.rmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            except OSError:
                pass
            # asyncio's transport reads one datagram per event-loop turn; under a flood the turn
            # (a poll and the loop's bookkeeping) costs more than the gate. Read up to DRAIN_BATCH
            # per turn instead, from a duplicate of the socket; the transport, paused for reading
            # (public API), still sends.
            transport.pause_reading()
            self._reader = socket.socket(fileno=os.dup(sock.fileno()))
            self._reader.setblocking(False)
            asyncio.get_event_loop().add_reader(self._reader.fileno(), self._drain)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reader is not None:
            asyncio.get_event_loop().remove_reader(self._reader.fileno())
            self._reader.close()
            self._reader = None
        super().connection_lost(exc)

    def _drain(self) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                data, addr = self._reader.recvfrom(MAX_DATAGRAM + 1)  # longer ones arrive cut, and are dropped
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error reported on the socket: nothing to read
                return
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """The gate first (constant work, nothing parsed, no crypto), then the channel: only a sealed
        datagram of a live session gets further (no task, no msgpack, no log line per datagram for
        anything else). A request is answered in its own task; a response resolves the call it answers
        on the session that call went out on, and gives back the gate token it spent."""
        if self.gate.admit(data, addr) is not None:
            return
        got = self.channel.receive(data, addr)
        if got is None:
            return
        session, payload = got
        self.gate.answered(addr)  # a live session: this address completed a cookie exchange
        if not payload:  # the responder's session confirmation
            return
        kind, msg_id = payload[:1], payload[1:21]
        try:
            body = umsgpack.unpackb(payload[21:])
        except Exception:  # a member's node or a client sending garbage: counted, never fatal
            self.channel.drop("malformed_rpc", addr)
            return
        if kind == b"\x00" and len(msg_id) == 20:
            self.spawn(self._serve(session, msg_id, body))
        elif kind == b"\x01":
            call = self._calls.get(msg_id)
            if call is None or call[1] is not session or call[0].done():
                self.channel.drop("unsolicited_response", addr)
                return
            self.gate.refund(addr)  # honest replies are paced by our own in-flight bound, not the gate
            call[0].set_result(body)
        else:
            self.channel.drop("malformed_rpc", addr)

    def is_certified(self, sender: object) -> bool:
        """True for an RPC sender that proved a node certificate (a member's node), False for a client."""
        return getattr(sender, "node_id", None) is not None

    def is_operator(self, peer: tuple) -> bool:
        return peer[0] in self.operators

    def dropped(self) -> Counter[str]:
        """Datagrams dropped before any RPC ran, by reason: at the gate and at the wire."""
        return self.gate.dropped + self.channel.drops

    async def _serve(self, session: Session, msg_id: bytes, body: Any) -> None:
        """rpcudp's ``_accept_request`` for an opened DATA datagram, the reply sealed on the same session."""
        sender = Peer(session.address, session)
        if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str) and isinstance(body[1], list)):
            self._reject("malformed_rpc", sender)
            return
        func = getattr(self, f"rpc_{body[0]}", None) if body[0].isidentifier() else None
        if func is None or not callable(func):
            self._reject("unknown_rpc", sender)
            return
        try:
            response = func(sender, *body[1])
            if asyncio.iscoroutine(response):
                response = await response
        except Exception:  # wrong arity or types from a peer
            self._reject("malformed_rpc", sender)
            return
        if response is not NO_REPLY:
            self.channel.send(session, b"\x01" + msg_id + umsgpack.packb(response))

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ bookkeeping
    def _reject(self, reason: str, sender: tuple | None = None, n: int = 1) -> None:
        """Count a refusal in memory (``save_counts`` adds them to SQLite once per upkeep pass, so a
        flood of refused items writes nothing); the log line is rate-limited per reason by
        ``qis_fhir.dht.logs`` and names the reason only."""
        self.rejections[reason] += n
        self._unsaved[reason] += n
        if sender is not None:
            log.info("rejected %d item(s): %s", n, reason, extra={"log_reason": reason})

    def log_dropped(self) -> None:
        """One line with the datagrams dropped (gate and wire) since the last call, by reason (if any)."""
        now = self.dropped()
        delta = now - self._dropped_logged
        self._dropped_logged = now
        if delta:
            log.warning("dropped %d datagrams: %s", sum(delta.values()), ", ".join(f"{r} {n}" for r, n in sorted(delta.items())))

    def save_counts(self) -> None:
        unsaved, self._unsaved = self._unsaved, Counter()
        if unsaved:
            with self.storage.transaction():
                for reason, n in unsaved.items():
                    self.storage.count_rejection(reason, n)

    def _welcome_sender(self, sender: tuple, nodeid: object) -> Node | None:
        """The sending node, welcomed into the routing table; None for a client (empty id), a node
        claiming an id its certificate does not give it, or nonsense: answered but never routed to."""
        if _valid_id(nodeid) and nodeid != self.source_node.id and getattr(sender, "node_id", None) == nodeid:
            source = Node(nodeid, sender[0], sender[1])
            self.welcome_if_new(source)
            return source
        return None

    def _my_id(self) -> bytes:
        return self.source_node.id if self.announce else b""

    def accept_packet(self, key: bytes, wire: object, ttl: object, sender: tuple | None = None) -> str:
        """Verify one packet and store it under ``key``; returns the store outcome or the reject reason."""
        if not isinstance(wire, bytes) or not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
            self._reject("malformed_item", sender)
            return "malformed_item"
        # screen without touching the replay state first: a packet refused below writes nothing
        check = getattr(self.verify, "check", None)
        verdict = check(wire) if check is not None else self.verify(wire)
        if not verdict.ok:
            reason = str(verdict.reason)
            self._reject(reason, sender)
            return reason
        packet = verdict.packet
        if dht_key(packet.fingerprint) != key:
            self._reject("wrong_key", sender)
            return "wrong_key"
        if not self.storage.has_room(key, packet.site_id, packet.packet_id):
            self._reject(QUOTA, sender)
            return QUOTA
        if check is not None:  # now record it in the replay state (the signature check is cached)
            verdict = self.verify(wire)
            if not verdict.ok:
                self._reject(str(verdict.reason), sender)
                return str(verdict.reason)
        outcome = self.storage.put(key, packet, wire, min(float(ttl), self.max_ttl))
        if outcome == QUOTA:
            self._reject(QUOTA, sender)
        return outcome

    # ------------------------------------------------------------------ RPCs served
    def rpc_ping(self, sender: tuple, nodeid: object) -> bytes:
        self._welcome_sender(sender, nodeid)
        return self.source_node.id

    def rpc_find_node(self, sender: tuple, nodeid: object, key: object) -> list:
        if not _valid_id(key):
            self._reject("malformed_rpc", sender)
            return []
        return self._neighbors(key, self._welcome_sender(sender, nodeid))

    def contacts(self) -> list[Node]:
        """Every node in the routing table."""
        return [n for bucket in self.router.buckets for n in bucket.get_nodes()]

    def closest_contacts(self, key: bytes, count: int, exclude: Node | None = None) -> list[Node]:
        """The ``count`` contacts closest to ``key`` by XOR distance, exactly.

        The stock ``RoutingTable.find_neighbors`` walks buckets outwards from the key's bucket and
        stops once it has k nodes, so it can miss closer contacts sitting in a bucket it reaches
        later; two lookups for one key then settle on different "closest" sets and a reader misses
        what a writer stored. A full sort of the table (at most a few thousand contacts) is cheap.
        """
        nodes = (n for n in self.contacts() if n.id != key and (exclude is None or not n.same_home_as(exclude)))
        return closest_to(key, nodes, count)

    def _neighbors(self, key: bytes, source: Node | None, room: int | None = None) -> list:
        """The 2k closest contacts to ``key``: twice the stock k, so that a walk still finds live
        nodes when the closest k we know include departed ones (small k, churn). As many of the
        closest as fit ``room`` packed bytes (default: a whole reply)."""
        room = RPC_CAP - 8 if room is None else room
        out = []
        for n in self.closest_contacts(key, REPLY_NODES_PER_K * self.router.ksize, exclude=source):
            room -= TRIPLE_MAX if ":" in str(n.ip) else TRIPLE_MAX_V4
            if room < 0:
                break
            out.append(tuple(n))
        return out

    def rpc_store(self, sender: tuple, nodeid: object, key: object, value: object) -> bool:
        """The package's store RPC, hardened: only a verified packet under its own key is kept."""
        if not _valid_id(key):
            self._reject("malformed_rpc", sender)
            return False
        self._welcome_sender(sender, nodeid)
        with self.storage.transaction():
            outcome = self.accept_packet(key, value, self.max_ttl, sender)
        return outcome in CONFIRMED

    def rpc_find_value(self, sender: tuple, nodeid: object, key: object) -> Any:
        """The package's find_value: one value per key (the newest packet stored here) or nodes."""
        if not _valid_id(key):
            self._reject("malformed_rpc", sender)
            return []
        value = self.storage.get(key)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        self._welcome_sender(sender, nodeid)
        return {"value": value}

    def rpc_store_packets(self, sender: tuple, nodeid: object, key: object, items: object) -> Any:
        """Store a batch of ``[wire, ttl_seconds]`` items under ``key``; one status per item."""
        if not _valid_id(key) or not isinstance(items, list) or len(items) > MAX_ITEMS_PER_STORE:
            self._reject("malformed_rpc", sender)
            return []
        self._welcome_sender(sender, nodeid)
        statuses = []
        with self.storage.transaction():
            for item in items:
                if not isinstance(item, list) or len(item) != 2:
                    self._reject("malformed_item", sender)
                    statuses.append("malformed_item")
                    continue
                statuses.append(self.accept_packet(key, item[0], item[1], sender))
        if self.identity is None:  # a client holds nothing for anyone
            return []
        wires = [item[0] if isinstance(item, list) and item else b"" for item in items]
        return {"s": statuses, "r": sign_receipt(self.identity, key, wires, statuses)}

    def rpc_find_packets(self, sender: tuple, nodeid: object, key: object, cursor: object = None) -> dict:
        """One page of ``key``'s packets (see module docstring); closest nodes on the first page."""
        if not _valid_id(key) or not (cursor is None or valid_cursor(cursor)):
            self._reject("malformed_rpc", sender)
            return {"count": 0, "nodes": []}
        source = self._welcome_sender(sender, nodeid)
        cap = RPC_CAP
        # nodes take at most half of the reply (it must still have room for its counts and packets)
        n4, nodes = pack_nodes(self._neighbors(key, source, cap // 2)) if cursor is None else (b"", [])
        count, digest = self.storage.digest(key)
        if count == 0:
            return {"count": 0, "n4": n4, "nodes": nodes}
        reply = {"count": count, "digest": digest, "n4": n4, "nodes": nodes, "packets": [], "next": None}
        # budget = cap - everything but the packets and the cursor; the array header may grow to 3 bytes
        budget = cap - packed_size(reply) - CURSOR_RESERVE - 2
        after = tuple(cursor) if cursor is not None else None
        while True:
            wires, nxt = self.storage.page(key, after, budget) if budget > 0 else ([], after)
            reply["packets"] = wires
            # no packet fit this budget: the cursor says "more from here" (["", ""] = from the start)
            reply["next"] = list(nxt) if nxt is not None else (None if wires else ["", ""])
            if packed_size(reply) <= cap or len(wires) <= 1:
                return reply
            budget -= 600  # never expected: shrink and measure again

    def rpc_stats(self, sender: tuple) -> Any:
        """Counts only (nothing identifying): packets and keys held, rejections and dropped datagrams
        by reason. Answered to operators' addresses and certified peers only, and the two counts that
        scan whole tables (packets, keys) are reused for ``STATS_CACHE`` seconds; anyone else gets
        no reply."""
        if not (self.is_operator(sender) or self.is_certified(sender)):
            self.channel.drop("stats_refused", sender)
            return NO_REPLY
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] >= STATS_CACHE:
            self._stats = (now, {"packets": self.storage.count(), "keys": len(self.storage.keys())})
        rejections = Counter(self.storage.rejections())
        rejections.update(self._unsaved)
        return {
            **self._stats[1],
            "rejections": dict(rejections),
            "dropped": dict(self.dropped()),  # datagrams dropped at the gate and the wire, by reason (not stored)
            "admitted": self.gate.admitted,
            "handshakes": dict(self.channel.handshakes),
            "contacts": len(self.contacts()),
            "handoff": {"pending": self.handoff.pending(), "dropped": self.handoff.dropped},
        }

    # ------------------------------------------------------------------ RPCs sent
    async def _request(self, session: Session, name: str, args: tuple) -> tuple[bool, Any]:
        data = umsgpack.packb([name, list(args)])
        if len(data) > RPC_CAP:
            raise MalformedMessage(f"{name} request over the {RPC_CAP}-byte cap")
        msg_id = os.urandom(20)
        future = asyncio.get_running_loop().create_future()
        self._calls[msg_id] = (future, session)
        try:
            self.channel.send(session, b"\x00" + msg_id + data)
            return (True, await asyncio.wait_for(future, self._wait_timeout))
        except TimeoutError:
            return (False, None)
        finally:
            self._calls.pop(msg_id, None)

    async def _call_session(self, name: str, address: tuple, args: tuple, expect: bytes | None = None) -> tuple[bool, Any, Session | None]:
        """One RPC to the certified node at ``address`` (``expect``: its node id) through the in-flight
        semaphore, handshaking first if needed and retrying a timeout ``retries`` times (over a new
        session: the peer may have restarted and forgotten ours). Returns (ok, reply, session)."""
        for _ in range(1 + self.retries):
            async with self._slots:
                self.rpc_sent += 1
                session = await self.channel.session_to(address, expect)
                if session is None:  # nobody answered the handshake, or not a (the expected) certified node
                    self.rpc_failed += 1
                    return (False, None, None)
                try:
                    ok, reply = await self._request(session, name, args)
                except MalformedMessage:
                    log.error("refusing to send an RPC over the %d-byte cap (a bug)", RPC_CAP)
                    return (False, None, None)
            if ok:
                return (True, reply, session)
            self.rpc_failed += 1
            self.channel.forget(session)
        return (False, None, None)

    async def _call(self, name: str, address: tuple, *args: Any) -> tuple[bool, Any]:
        ok, reply, _ = await self._call_session(name, address, args)
        return (ok, reply)

    async def _call_node(self, name: str, node: Node, *args: Any) -> tuple[bool, Any]:
        """An RPC to a known node with our id, answered only if the peer proves it is that node, then the
        package's routing-table bookkeeping (``handle_call_response``: welcome it on a reply, drop it on none)."""
        ok, reply, _ = await self._call_session(name, (node.ip, node.port), (self._my_id(), *args), expect=node.id)
        return self.handle_call_response((ok, reply), node)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call_node("find_node", node_to_ask, node_to_find.id)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call_node("find_value", node_to_ask, node_to_find.id)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        """One ping per contact in flight: the stock table pings a full bucket's head for every new
        id that lands there, so a flood of fresh ids would queue one ping each."""
        key = (node_to_ask.id, node_to_ask.ip, node_to_ask.port)
        pending = self._pings.get(key)
        if pending is None:
            pending = self._pings[key] = asyncio.ensure_future(self._call_node("ping", node_to_ask))
            pending.add_done_callback(lambda _: self._pings.pop(key, None))
        return await asyncio.shield(pending)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        return await self._call_node("store", node_to_ask, key, value)

    async def ping_address(self, address: tuple) -> Node | None:
        """Ping an address (a bootstrap peer): the node its certificate proves, welcomed, or None."""
        ok, _, session = await self._call_session("ping", address, (self._my_id(),))
        if ok and session is not None and session.peer is not None:
            node = Node(session.peer_id, address[0], address[1])
            self.welcome_if_new(node)
            return node
        return None

    async def call_find_packets(self, node: Node, key: bytes, cursor: list | None = None) -> tuple[bool, Any]:
        return await self._call_node("find_packets", node, key, cursor)

    async def call_stats(self, address: tuple) -> tuple[bool, Any]:
        return await self._call("stats", address)

    def store_base_size(self, key: bytes) -> int:
        """Packed size of a store_packets request with no items (what a batch adds to)."""
        return packed_size(["store_packets", [self._my_id(), key, []]])

    async def send_packets(self, node: Node, key: bytes, items: list) -> list[str]:
        """Store ``[wire, ttl]`` items on ``node`` in batches under the cap; one status per item
        ("stored"/"held"/reject reason, or "no_reply" when the node never answered)."""
        statuses: list[str] = []
        for batch in pack_batches(items, self.store_base_size(key), max_items=MAX_ITEMS_PER_STORE):
            ok, reply, session = await self._call_session("store_packets", (node.ip, node.port), (self._my_id(), key, batch), expect=node.id)
            self.handle_call_response((ok, reply), node)
            statuses.extend(self._receipted(session, key, batch, reply) if ok else ["no_reply"] * len(batch))
        return statuses

    def _receipted(self, session: Session | None, key: bytes, batch: list, reply: object) -> list[str]:
        """The statuses a certified node signed for ``batch``; ``bad_receipt`` for all when the
        receipt is missing, malformed, or not that node's signature over exactly this batch."""
        statuses = reply.get("s") if isinstance(reply, dict) else None
        if (
            session is None
            or session.peer is None
            or not isinstance(statuses, list)
            or not all(isinstance(s, str) for s in statuses)
            or not self.channel.checker.still_valid(session.peer)
            or not receipt_valid(session.peer, key, [item[0] for item in batch], statuses, reply.get("r"))
        ):
            return ["bad_receipt"] * len(batch)
        return statuses

    # ------------------------------------------------------------------ routing table
    def welcome_if_new(self, node: Node) -> None:
        """Add a new node; hand it the packets it should hold (paper section 2.5, keys kept as-is)."""
        if not _valid_id(node.id) or node.id == self.source_node.id:
            return
        if not self.channel.certified(node.id, (node.ip, node.port)):
            return  # only a node that proved its certificate in a live session at that address
        if not self.router.is_new_node(node):
            # a known id seen at a new address (a node restarted on another port): the stock table
            # would keep the dead address forever; we heard from this one directly, so take it
            bucket = self.router.buckets[self.router.get_bucket_for(node)]
            known = bucket.nodes.get(node.id)
            if known is not None and (known.ip, known.port) != (node.ip, node.port):
                bucket.add_node(node)
            return
        # one id per address: a node back with a new id, or one socket minting ids by the thousand,
        # holds one place in the table, not one per id
        address = (node.ip, node.port)
        old = self._id_at.pop(address, None)
        if old is not None and old != node.id:
            self.router.remove_contact(Node(old))
        self._id_at[address] = node.id
        if len(self._id_at) > MAX_ADDRESSES:
            self._id_at.popitem(last=False)
        self.router.add_contact(node)
        # a newcomer that made it into the table (not just the replacement cache) is queued for
        # hand-off: constant work here, the key scan runs paced in qis_fhir.dht.handoff
        if self.announce and self.knows(node):
            self.handoff.offer(node)

    def knows(self, node: Node) -> bool:
        """Whether ``node`` (this id at this address) is in the routing table."""
        known = self.router.buckets[self.router.get_bucket_for(node)].nodes.get(node.id)
        return known is not None and (known.ip, known.port) == (node.ip, node.port)
