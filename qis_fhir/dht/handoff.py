"""Handing a newly seen node the packets it should hold, off the event loop's critical path.

Kademlia (paper section 2.5) has a node that learns of a newcomer store on it the keys the newcomer
is now among the k closest to, when this node is the closest holder it knows. Done inline, that
check scanned every stored key and sorted the contact table once per key for every unseen node id
in any RPC: 3,000 pings from fresh ids held a node at 100% CPU for 2.5 minutes.

Here a newcomer only joins a bounded queue (``max_queue`` ids, deduplicated; more are dropped and
counted: republish reaches a dropped newcomer within ``republish_interval``). One worker task walks
the stored keys in slices of ``slice_keys`` (keyset pages from SQLite, never the whole list),
skips a newcomer no longer in the routing table (an id minted and replaced at once costs one
lookup), checks each key against the contacts with one pass over their ids (no sort), sends what the
newcomer should hold, and after each slice sleeps in proportion to the CPU the slice took, so
hand-off work takes at most ``duty`` of one core however many ids arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from kademlia.node import Node

from qis_fhir.dht.storage import PacketStore

log = logging.getLogger("qis_fhir.dht.handoff")


def should_hand_off(key: int, newcomer: int, me: int, contacts: list[int], ksize: int) -> bool:
    """True when ``newcomer`` is among the ``ksize`` closest to ``key`` and no contact is closer than us.

    ``contacts`` are the long ids of every contact except the newcomer. With fewer than k of them
    the newcomer is among the k closest whatever its distance."""
    mine = me ^ key
    theirs = newcomer ^ key
    closer_than_newcomer = 0
    for c in contacts:
        d = c ^ key
        if d < mine:
            return False  # somebody else is the closest holder we know of: theirs to hand off
        if d < theirs:
            closer_than_newcomer += 1
    return closer_than_newcomer < ksize


class HandOff:
    """The bounded, paced hand-off queue of one node (see module docstring)."""

    def __init__(
        self,
        storage: PacketStore,
        me: Node,
        contacts: Callable[[], list[Node]],
        ksize: int,
        send: Callable[[Node, bytes, list], Awaitable[object]],
        *,
        still_known: Callable[[Node], bool] = lambda node: True,
        max_queue: int = 64,
        slice_keys: int = 256,
        duty: float = 0.2,
    ) -> None:
        self.storage = storage
        self.me = me
        self.contacts = contacts
        self.ksize = ksize
        self.send = send
        self.still_known = still_known
        self.max_queue = max_queue
        self.slice_keys = slice_keys
        self.duty = duty
        self._queue: OrderedDict[bytes, Node] = OrderedDict()
        self._worker: asyncio.Task | None = None
        self.dropped = 0
        self.handed_keys = 0

    def offer(self, node: Node) -> None:
        """Queue ``node`` (constant work); a full queue drops it."""
        if node.id in self._queue:
            return
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue[node.id] = node
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())

    def pending(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _run(self) -> None:
        while self._queue:
            _, node = self._queue.popitem(last=False)
            try:
                await self._hand_off(node)
            except asyncio.CancelledError:
                raise
            except Exception:  # one newcomer's failure must not stop the queue
                log.exception("hand-off failed")

    async def _hand_off(self, node: Node) -> None:
        after = b""
        while self.still_known(node):  # an id replaced or dropped meanwhile gets nothing more
            started = time.process_time()
            keys = self.storage.keys_after(after, self.slice_keys)
            if not keys:
                return
            after = keys[-1]
            contacts = [c.long_id for c in self.contacts() if c.id != node.id and not c.same_home_as(node)]
            due = [k for k in keys if should_hand_off(int.from_bytes(k, "big"), node.long_id, self.me.long_id, contacts, self.ksize)]
            now = time.time()
            batches = [(k, self.storage.items_to_pass_on(k, now)) for k in due]
            spent = time.process_time() - started
            for key, items in batches:
                if items:
                    await self.send(node, key, items)
                    self.handed_keys += 1
            # pace: a slice that took t seconds of CPU is followed by t * (1 - duty) / duty of rest
            await asyncio.sleep(spent * (1.0 - self.duty) / self.duty)
