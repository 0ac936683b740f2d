"""Iterative Kademlia lookups that count their hops.

The package's spider crawls return only nodes or one value. Ours walk towards a key in rounds of
``alpha`` parallel RPCs (all remaining candidates at once when a round brings nothing closer, as the
paper says), and remember every reply, so one walk both finds the ``ksize`` closest nodes and
collects the first page of packets each of them holds. ``hops`` counts sequential rounds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node, NodeHeap

MAX_ROUNDS = 64  # far above log2 of any network we run; bounds a lookup fed bogus nodes
# Seed a lookup with this many known contacts, not just k: the heap shows only the k closest, and
# when those turn out dead the hidden ones take their place instead of the walk ending empty-handed
# (the stock crawl seeds k and can run dry after a few departures).
SEED_LIMIT = 256


@dataclass
class Lookup:
    target: bytes
    closest: list[Node] = field(default_factory=list)  # the ksize closest nodes that answered
    replies: dict[bytes, tuple[Node, Any]] = field(default_factory=dict)  # node id -> (node, reply)
    hops: int = 0
    asked: int = 0
    heard_of: dict[bytes, Node] = field(default_factory=dict)  # every node a reply named
    dead: set[bytes] = field(default_factory=set)  # nodes that did not answer


def _nodes_from(triples: object, exclude: bytes) -> list[Node]:
    nodes = []
    if not isinstance(triples, list):
        return nodes
    for t in triples:
        if (
            isinstance(t, list)
            and len(t) == 3
            and isinstance(t[0], bytes)
            and len(t[0]) == 20
            and isinstance(t[1], str)
            and isinstance(t[2], int)
            and 0 < t[2] < 65536
            and t[0] != exclude
        ):
            nodes.append(Node(t[0], t[1], t[2]))
    return nodes


async def iterative_lookup(
    seeds: list[Node],
    target: bytes,
    ksize: int,
    alpha: int,
    ask: Callable[[Node], Awaitable[tuple[bool, Any]]],
    nodes_of: Callable[[Any], object],
    self_id: bytes = b"",
    done: Callable[[list[Node], dict], bool] | None = None,
) -> Lookup:
    """Walk towards ``target`` calling ``ask(node)``; ``nodes_of(reply)`` extracts node triples.

    ``done(closest_known, replies)``, checked after each round, may end the walk before every one of
    the ``ksize`` closest has been asked (a quorum read)."""
    import asyncio

    result = Lookup(target)
    heap = NodeHeap(Node(target), ksize)
    heap.push([n for n in seeds if n.id != self_id])
    last_ids: list[bytes] | None = None
    while result.hops < MAX_ROUNDS:
        uncontacted = heap.get_uncontacted()
        if not uncontacted:
            break
        ids = heap.get_ids()
        count = alpha if ids != last_ids else len(uncontacted)
        last_ids = ids
        batch = uncontacted[:count]
        for node in batch:
            heap.mark_contacted(node)
        result.hops += 1
        result.asked += len(batch)
        replies = await asyncio.gather(*(ask(node) for node in batch))
        dead = []
        for node, (ok, reply) in zip(batch, replies):
            if not ok:
                dead.append(node.id)
                result.dead.add(node.id)
                continue
            result.replies[node.id] = (node, reply)
            named = _nodes_from(nodes_of(reply), self_id)
            result.heard_of.update((n.id, n) for n in named)
            heap.push([n for n in named if n.id not in result.dead])
        heap.remove(dead)
        if done is not None and done(list(heap), result.replies):
            break
    result.closest = [n for n in heap if n.id in result.replies]
    return result
