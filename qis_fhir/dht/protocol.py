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
  right keys (the stock ``welcome_if_new`` re-hashes keys and sends them under wrong ids).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.exceptions import MalformedMessage

from qis_fhir.dht.address import format_address
from qis_fhir.dht.keys import RPC_CAP, dht_key, pack_batches, pack_nodes, packed_size
from qis_fhir.dht.lookup import REPLY_NODES_PER_K, closest_to
from qis_fhir.dht.storage import CONFIRMED, QUOTA, PacketStore

log = logging.getLogger("qis_fhir.dht.protocol")

MAX_ITEMS_PER_STORE = 64
MAX_CURSOR_FIELD = 128
CURSOR_RESERVE = 2 * MAX_CURSOR_FIELD + 8  # packed [site_id, packet_id] at their longest
RECV_BUFFER = 4 * 1024 * 1024

Verify = Callable[[bytes], Any]  # -> Verdict(ok, reason, packet)


def _valid_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 20


def valid_cursor(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) and len(v) <= MAX_CURSOR_FIELD for v in value)
    )


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
    ) -> None:
        super().__init__(source_node, storage, ksize)
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
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a bigger receive buffer absorbs bursts of replies (capped by net.core.rmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            except OSError:
                pass

    async def _solve_datagram(self, datagram: bytes, address: tuple) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception:  # garbage on the socket must not kill or spam the node
            self._reject("malformed_datagram", address)

    async def _accept_request(self, msg_id: bytes, data: Any, address: tuple) -> None:
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception:
            self._reject("malformed_rpc", address)

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
        self.rejections[reason] += n
        try:
            self.storage.count_rejection(reason, n)
        except Exception:  # never let accounting break serving
            pass
        if sender is not None:
            # at most one line per reason per second, so a flood of junk cannot flood the log
            now = time.monotonic()
            self._unlogged[reason] += n
            if now - self._logged_at.get(reason, -1e9) >= 1.0:
                log.info("rejected %d item(s), latest from %s: %s", self._unlogged[reason], format_address(*sender[:2]), reason)
                self._logged_at[reason] = now
                self._unlogged[reason] = 0

    def _welcome_sender(self, sender: tuple, nodeid: object) -> Node | None:
        """The sending node, welcomed into the routing table; None for a client (empty id) or
        nonsense, which is answered but never routed to."""
        if _valid_id(nodeid) and nodeid != self.source_node.id:
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
        verdict = self.verify(wire)
        if not verdict.ok:
            reason = str(verdict.reason)
            self._reject(reason, sender)
            return reason
        packet = verdict.packet
        if dht_key(packet.fingerprint) != key:
            self._reject("wrong_key", sender)
            return "wrong_key"
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

    def _neighbors(self, key: bytes, source: Node | None) -> list:
        """The 2k closest contacts to ``key``: twice the stock k, so that a walk still finds live
        nodes when the closest k we know include departed ones (small k, churn)."""
        return [tuple(n) for n in self.closest_contacts(key, REPLY_NODES_PER_K * self.router.ksize, exclude=source)]

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

    def rpc_store_packets(self, sender: tuple, nodeid: object, key: object, items: object) -> list:
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
        return statuses

    def rpc_find_packets(self, sender: tuple, nodeid: object, key: object, cursor: object = None) -> dict:
        """One page of ``key``'s packets (see module docstring); closest nodes on the first page."""
        if not _valid_id(key) or not (cursor is None or valid_cursor(cursor)):
            self._reject("malformed_rpc", sender)
            return {"count": 0, "nodes": []}
        source = self._welcome_sender(sender, nodeid)
        n4, nodes = pack_nodes(self._neighbors(key, source)) if cursor is None else (b"", [])
        count, digest = self.storage.digest(key)
        if count == 0:
            return {"count": 0, "n4": n4, "nodes": nodes}
        reply = {"count": count, "digest": digest, "n4": n4, "nodes": nodes, "packets": [], "next": None}
        # budget = cap - everything but the packets and the cursor; the array header may grow to 3 bytes
        budget = RPC_CAP - packed_size(reply) - CURSOR_RESERVE - 2
        after = tuple(cursor) if cursor is not None else None
        while True:
            wires, nxt = self.storage.page(key, after, budget)
            reply["packets"] = wires
            reply["next"] = list(nxt) if nxt is not None else None
            if packed_size(reply) <= RPC_CAP or len(wires) <= 1:
                return reply
            budget -= 600  # never expected: shrink and measure again

    def rpc_stats(self, sender: tuple) -> dict:
        """Counts only (nothing identifying): packets and keys held, rejections by reason."""
        return {
            "packets": self.storage.count(),
            "keys": len(self.storage.keys()),
            "rejections": self.storage.rejections(),
            "contacts": len(self.contacts()),
        }

    # ------------------------------------------------------------------ RPCs sent
    async def _call(self, name: str, address: tuple, *args: Any) -> tuple[bool, Any]:
        """Send one RPC through the in-flight semaphore, retrying a timeout ``retries`` times."""
        for _ in range(1 + self.retries):
            async with self._slots:
                self.rpc_sent += 1
                try:
                    result = await getattr(self, name)(address, *args)
                except MalformedMessage:
                    log.error("refusing to send an RPC over the %d-byte cap (a bug)", RPC_CAP)
                    return (False, None)
            if result[0]:
                return result
            self.rpc_failed += 1
        return (False, None)

    async def _call_node(self, name: str, node: Node, *args: Any) -> tuple[bool, Any]:
        """``_call`` to a known node with our id, then the package's routing-table bookkeeping
        (``handle_call_response``: welcome it on a reply, drop it on none)."""
        result = await self._call(name, (node.ip, node.port), self._my_id(), *args)
        return self.handle_call_response(result, node)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call_node("find_node", node_to_ask, node_to_find.id)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call_node("find_value", node_to_ask, node_to_find.id)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        return await self._call_node("ping", node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        return await self._call_node("store", node_to_ask, key, value)

    async def ping_address(self, address: tuple) -> Node | None:
        ok, nodeid = await self._call("ping", address, self._my_id())
        if ok and _valid_id(nodeid):
            node = Node(nodeid, address[0], address[1])
            self.welcome_if_new(node)
            return node
        return None

    async def call_store_packets(self, node: Node, key: bytes, items: list) -> tuple[bool, Any]:
        return await self._call_node("store_packets", node, key, items)

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
            ok, reply = await self.call_store_packets(node, key, batch)
            if ok and isinstance(reply, list) and len(reply) == len(batch):
                statuses.extend(str(s) for s in reply)
            else:
                statuses.extend(["no_reply"] * len(batch))
        return statuses

    # ------------------------------------------------------------------ routing table
    def welcome_if_new(self, node: Node) -> None:
        """Add a new node; hand it the packets it should hold (paper section 2.5, keys kept as-is)."""
        if not _valid_id(node.id) or node.id == self.source_node.id:
            return
        if not self.router.is_new_node(node):
            # a known id seen at a new address (a node restarted on another port): the stock table
            # would keep the dead address forever; we heard from this one directly, so take it
            bucket = self.router.buckets[self.router.get_bucket_for(node)]
            known = bucket.nodes.get(node.id)
            if known is not None and (known.ip, known.port) != (node.ip, node.port):
                bucket.add_node(node)
            return
        keys = self._keys_to_hand_off(node) if self.announce else []
        self.router.add_contact(node)
        if keys:
            self.spawn(self._hand_off(node, keys))

    def _keys_to_hand_off(self, node: Node) -> list[bytes]:
        keys = []
        for key in self.storage.keys():
            keynode = Node(key)
            neighbors = self.closest_contacts(key, self.router.ksize)
            if neighbors:
                # with fewer than k known neighbours the newcomer is among the k closest whatever its
                # distance (the stock test compares with the furthest only, and so misses that case)
                new_node_close = len(neighbors) < self.router.ksize or node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                keys.append(key)
        return keys

    async def _hand_off(self, node: Node, keys: list[bytes]) -> None:
        now = time.time()
        for key in keys:
            items = self.storage.items_to_pass_on(key, now)
            if items:
                await self.send_packets(node, key, items)
