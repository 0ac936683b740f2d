"""Kademlia at scale in one process: the real lookup code over a simulated network on a virtual clock.

Real nodes need a process slot and a socket each; 3,000 of them already overload a 2-core machine,
so the question "does the lookup converge at N nodes, and in how many hops?" cannot be answered
with real nodes beyond a few thousand. Here every node is a :class:`SimPeer` in one process, and
what decides a lookup's outcome is the code the real nodes and clients run, imported, not copied:

* every walk is :func:`qis_fhir.dht.lookup.iterative_lookup` (joins and publishes with ``alpha``
  FIND_NODEs per round, queries with ``k`` find_packets per round, as ``DhtClient`` does), and a
  query that ran dry after losing nodes walks again through :func:`lookup_until_found`, exactly
  as ``DhtClient.fetch``;
* every routing table is the package's ``kademlia.routing.RoutingTable`` (its bucket splits,
  replacement caches and the ping of a full bucket's head), fed as ``PacketProtocol`` feeds it:
  a sender is welcomed on every request, a node that answers is welcomed, one that does not is
  removed;
* every reply names the ``REPLY_NODES_PER_K * k`` closest contacts by :func:`closest_to`, and a
  find_packets reply packs them with ``keys.pack_nodes`` and is read with ``client.named_nodes``.

What is modelled instead of run: the datagrams (a reply is the handler's return value, delivered
after a sampled delay; nothing is encoded), packets (ids, not signed packets: nothing is verified),
and storage (a dict). Time is virtual: :class:`VirtualClockLoop` is an asyncio loop whose clock
jumps to the next scheduled event instead of sleeping, so RPC timeouts, retries and latencies
behave as on a network without anyone waiting for them: 10,000 nodes with 10% churn take about 22
minutes of CPU and 700 MiB (docs/dht.md, "Scale"); the CPU goes to building the network by the real
join (178 RPCs a node). ``experiment(build="converged")`` skips that: every node's real
``RoutingTable`` is filled directly with what a converged network's holds
(:meth:`SimNetwork.build_converged`), which is what makes 30,000 and more nodes measurable.

Hand-off to newcomers and republish are not simulated, so recall after churn is measured with no
repair at all (the real network repairs on top of it).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import resource
import selectors
import statistics
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from kademlia.node import Node
from kademlia.routing import RoutingTable

from qis_fhir.dht.client import holds_packets, named_nodes
from qis_fhir.dht.keys import pack_nodes
from qis_fhir.dht.lookup import (
    REPLY_NODES_PER_K,
    SEED_LIMIT,
    Lookup,
    closest_to,
    iterative_lookup,
    lookup_until_found,
    refresh_targets,
)

BUILDS = ("join", "converged")  # how experiment() builds the network: see its docstring
SIM_PORT = 8468  # every simulated node listens on this port at its own 10.x.y.z address


class _AdvancingSelector(selectors.SelectSelector):
    """Never waits: a select with a timeout moves the loop's clock forward by that timeout."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:  # nothing scheduled and nothing ready: on a real loop this would hang
            raise RuntimeError("simulation stalled: a task waits for an event nothing will deliver")
        if timeout > 0:
            self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: ``call_later``/``sleep``/timeouts fire in order, instantly.

    ``time()`` is the virtual clock; when nothing is ready, the loop's own scheduler asks the
    selector to wait until the next timer, and the selector advances the clock by exactly that."""

    def __init__(self) -> None:
        selector = _AdvancingSelector()
        self.now = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


@dataclass(frozen=True)
class SimConfig:
    ksize: int = 8  # what `qis-fhir bench --only dht` runs
    alpha: int = 3
    query_alpha: int | None = None  # None: max(alpha, ksize), the DhtClient default
    rtt: float = 0.02  # median round trip, seconds
    rtt_p95: float | None = 0.06  # 95th percentile round trip (log-normal); None: every RTT is ``rtt``
    loss: float = 0.0  # probability that one datagram is lost
    rpc_timeout: float = 3.0
    retries: int = 1  # as PacketProtocol: a timed-out RPC is sent once more
    max_inflight: int = 32  # outgoing RPCs in flight per peer, as PacketProtocol
    join_concurrency: int = 32  # nodes joining at once while the network is built
    join_refresh: bool = True  # DhtNode.join's refresh of the subtrees its own lookup never met
    seed: int = 7

    @property
    def walk_alpha(self) -> int:
        return self.query_alpha or max(self.alpha, self.ksize)


class SimPeer:
    """One simulated node (``announce``) or client (never put in a routing table)."""

    __slots__ = ("net", "node", "router", "store", "alive", "announce", "slots")

    def __init__(self, net: SimNetwork, node: Node, announce: bool) -> None:
        self.net = net
        self.node = node
        self.router = RoutingTable(self, net.config.ksize, node)
        self.store: dict[bytes, set[int]] = {}
        self.alive = True
        self.announce = announce
        self.slots: asyncio.Semaphore | None = None

    # the routing table calls this to ping the head of a full bucket (paper section 4.1)
    async def call_ping(self, node: Node) -> tuple[bool, Any]:
        return await self.net.call(self, node, "ping")

    def contacts(self) -> list[Node]:
        return [n for bucket in self.router.buckets for n in bucket.nodes.values()]

    def closest_contacts(self, key: bytes, count: int, exclude: bytes = b"") -> list[Node]:
        return closest_to(key, (n for n in self.contacts() if n.id != key and n.id != exclude), count)

    def welcome(self, node: Node) -> None:
        """``PacketProtocol.welcome_if_new`` without the hand-off (not simulated)."""
        if node.id != self.node.id and self.router.is_new_node(node):
            self.router.add_contact(node)

    def serve(self, name: str, sender: SimPeer, args: tuple) -> Any:
        """Answer one request as ``PacketProtocol`` does (welcome the sender unless it is a client)."""
        if sender.announce:
            self.welcome(sender.node)
        if name == "ping":
            return self.node.id
        key = args[0]
        if name == "store_packets":
            self.store.setdefault(key, set()).update(args[1])
            return len(args[1])
        near = self.closest_contacts(key, REPLY_NODES_PER_K * self.net.config.ksize, exclude=sender.node.id if sender.announce else b"")
        triples = [(n.id, n.ip, n.port) for n in near]
        if name == "find_node":
            return [list(t) for t in triples]
        if name == "find_packets":
            n4, others = pack_nodes(triples)
            held = self.store.get(key, ())
            return {"count": len(held), "packets": sorted(held), "n4": n4, "nodes": others}
        raise ValueError(f"unknown RPC {name}")


class SimNetwork:
    """Peers, the datagram model, and the join/publish/query/churn steps of one experiment."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.loop = VirtualClockLoop()
        self.peers: dict[tuple[str, int], SimPeer] = {}
        self.nodes: list[SimPeer] = []  # every announcing peer ever made, departed ones included
        self._live: list[SimPeer] = []
        self.rpcs = 0
        self.timeouts = 0
        p95 = self.config.rtt_p95
        self._sigma = math.log(p95 / self.config.rtt) / 1.6449 if p95 and p95 > self.config.rtt else 0.0

    def close(self) -> None:
        self.loop.close()

    def run(self, coro: Coroutine) -> Any:
        """Run ``coro`` to completion on the virtual clock, then let background pings finish."""

        async def main() -> Any:
            result = await coro
            while pending := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                await asyncio.gather(*pending, return_exceptions=True)
            return result

        return self.loop.run_until_complete(main())

    # ------------------------------------------------------------------ peers
    def new_peer(self, announce: bool = True) -> SimPeer:
        i = len(self.peers) + 1
        address = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", SIM_PORT)
        node = Node(self.rng.getrandbits(160).to_bytes(20, "big"), *address)
        peer = SimPeer(self, node, announce)
        self.peers[address] = peer
        if announce:
            self.nodes.append(peer)
        return peer

    def live(self) -> list[SimPeer]:
        return self._live

    # ------------------------------------------------------------------ converged build
    def _converge(self, peer: SimPeer, ids: list[int], nodes: list[Node]) -> None:
        """Fill ``peer``'s real ``RoutingTable`` as a converged network's would be: each bucket is
        offered up to k + 1 random nodes of its own id range (k to fill it, one more so that the
        table's own rules decide whether a full bucket splits), again for every bucket a split makes,
        until every bucket range has had its offer. ``ids``/``nodes``: the network sorted by id.

        A full bucket that may not split pings its head: ``_HeadAnswers`` stands for that ping."""
        table, k, own = peer.router, self.config.ksize, peer.node.long_id
        table.protocol = _HeadAnswers(peer)
        offered: set[int] = set()
        done: set[tuple[int, int]] = set()
        while todo := [b for b in table.buckets if b.range not in done]:
            for bucket in todo:
                done.add(bucket.range)
                lo, hi = bisect.bisect_left(ids, bucket.range[0]), bisect.bisect_left(ids, bucket.range[1])
                want = k + 1 - len(bucket.nodes)
                if hi - lo <= 4 * (k + 1):
                    picks: Any = [i for i in range(lo, hi) if i not in offered]
                    self.rng.shuffle(picks)
                else:  # a few hundred draws: far more than a range this wide can have offered already
                    picks = (self.rng.randrange(lo, hi) for _ in range(64 * (k + 1)))
                fed = 0
                for i in picks:
                    if fed == want:
                        break
                    if i in offered:
                        continue
                    offered.add(i)
                    if ids[i] != own:
                        table.add_contact(nodes[i])
                        fed += 1
        table.protocol = peer

    def build_converged(self, count: int) -> None:
        """``count`` nodes whose tables are what the real join and refresh converge to, built directly
        (no join traffic): ``_converge`` over the globally sorted id space, one ``Node`` per id shared
        by every table that holds it."""
        peers = [self.new_peer() for _ in range(count)]
        ordered = sorted(peers, key=lambda p: p.node.long_id)
        ids, nodes = [p.node.long_id for p in ordered], [p.node for p in ordered]
        for peer in peers:
            self._converge(peer, ids, nodes)
        self._live.extend(peers)

    def join_converged(self, count: int) -> None:
        """``count`` newcomers after churn, the constructed way: each gets a converged table over the
        live nodes (it learnt of no departed one), and every node in that table is offered the
        newcomer, as the nodes a real join asks welcome it; a full bucket's head that departed is
        found dead by its ping and replaced (``_HeadAnswers``)."""
        ordered = sorted(self._live, key=lambda p: p.node.long_id)
        ids, nodes = [p.node.long_id for p in ordered], [p.node for p in ordered]
        for _ in range(count):
            peer = self.new_peer()
            self._converge(peer, ids, nodes)
            for contact in peer.contacts():
                known = self.peers[(contact.ip, contact.port)]
                known.router.protocol = _HeadAnswers(known)
                known.welcome(peer.node)
                known.router.protocol = known
            at = bisect.bisect_left(ids, peer.node.long_id)
            ids.insert(at, peer.node.long_id)
            nodes.insert(at, peer.node)
            self._live.append(peer)

    # ------------------------------------------------------------------ datagrams
    def _rtt(self) -> float:
        if not self._sigma:
            return self.config.rtt
        return self.config.rtt * math.exp(self.rng.gauss(0.0, self._sigma))

    def _lost(self) -> bool:
        return self.config.loss > 0 and self.rng.random() < self.config.loss

    async def _send(self, src: SimPeer, address: tuple[str, int], name: str, args: tuple) -> tuple[bool, Any]:
        """One request and its reply: each way half a sampled RTT, each datagram lost with ``loss``;
        no reply within ``rpc_timeout`` is a failure. Peers only leave between steps, so whether a
        reply will come is known when the request leaves: one timer per RPC, none cancelled."""
        loop = self.loop
        done = loop.create_future()
        rtt = self._rtt()
        dst = self.peers.get(address)
        delivered = dst is not None and dst.alive and not self._lost()
        answered = delivered and not self._lost() and rtt <= self.config.rpc_timeout

        def arrive() -> None:
            reply = dst.serve(name, src, args)  # served (and stored) even when the reply is then lost
            if answered:
                loop.call_at(loop.now + rtt / 2, done.set_result, (True, reply))

        if delivered:
            loop.call_at(loop.now + rtt / 2, arrive)
        if not answered:
            loop.call_at(loop.now + self.config.rpc_timeout, done.set_result, (False, None))
        return await done

    async def call(self, src: SimPeer, node: Node, name: str, *args: Any) -> tuple[bool, Any]:
        """``PacketProtocol._call_node``: bounded in flight, one retry, then the routing-table
        bookkeeping of ``handle_call_response`` (welcome on a reply, remove on none)."""
        if src.slots is None:
            src.slots = asyncio.Semaphore(self.config.max_inflight)
        result: tuple[bool, Any] = (False, None)
        for _ in range(1 + self.config.retries):
            async with src.slots:
                self.rpcs += 1
                result = await self._send(src, (node.ip, node.port), name, args)
            if result[0]:
                break
            self.timeouts += 1
        if result[0]:
            src.welcome(node)
        else:
            src.router.remove_contact(node)
        return result

    # ------------------------------------------------------------------ steps
    async def closest_nodes(self, peer: SimPeer, key: bytes, seeds: list[Node] | None = None) -> Lookup:
        """``DhtNode.closest_nodes``: an iterative FIND_NODE with ``alpha`` per round."""
        if seeds is None:
            seeds = peer.closest_contacts(key, SEED_LIMIT)
        return await iterative_lookup(seeds, key, self.config.ksize, self.config.alpha,
                                      ask=lambda n: self.call(peer, n, "find_node", key),
                                      nodes_of=lambda reply: reply, self_id=peer.node.id)

    async def join(self, peer: SimPeer, bootstrap: list[SimPeer]) -> int:
        """``DhtNode.join``: ping the bootstrap peers, look up our own id, then (a node) refresh the
        subtrees that lookup never met; ``join_refresh=False`` is the join before that refresh."""
        answered = await asyncio.gather(*(self.call(peer, b.node, "ping") for b in bootstrap))
        seeds = [b.node for b, (ok, _) in zip(bootstrap, answered) if ok]
        if seeds:
            await self.closest_nodes(peer, peer.node.id, seeds=seeds)
            if peer.announce and self.config.join_refresh:
                targets = refresh_targets(peer.node.id, peer.contacts(), self.config.ksize, self.rng)
                await asyncio.gather(*(self.closest_nodes(peer, t) for t in targets))
        return len(peer.contacts())

    async def grow(self, count: int) -> None:
        """Add ``count`` nodes, each joining through the first node (while it lives) and a random
        live one, ``join_concurrency`` at a time (the bench's workers join through a seed too)."""
        remaining = count

        async def joiner() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                live = self._live
                peer = self.new_peer()
                boot = [live[0]] + [b for b in [self.rng.choice(live)] if b is not live[0]]
                await self.join(peer, boot)
                live.append(peer)

        if not self._live:
            self._live.append(self.new_peer())
            remaining -= 1
        await asyncio.gather(*(joiner() for _ in range(self.config.join_concurrency)))

    def churn(self, fraction: float) -> tuple[int, int]:
        """``fraction`` of the live nodes leave without a word (they stay in others' tables, as a
        crashed node does); returns (left, to_join): as many new nodes must then ``grow``."""
        live = self.live()
        leaving = self.rng.sample(live, round(fraction * len(live)))
        for peer in leaving:
            peer.alive = False
        self._live = [p for p in live if p.alive]
        return len(leaving), len(leaving)

    async def client(self) -> SimPeer:
        """A short-lived client (``DhtClient.start``) bootstrapped from two random live nodes."""
        peer = self.new_peer(announce=False)
        await self.join(peer, self.rng.sample(self.live(), min(2, len(self.live()))))
        return peer

    async def publish(self, client: SimPeer, key: bytes, packets: list[int]) -> int:
        """``DhtClient.publish`` for one key: store on its k closest; returns the confirmed replicas."""
        lookup = await self.closest_nodes(client, key)
        stored = await asyncio.gather(*(self.call(client, n, "store_packets", key, packets) for n in lookup.closest))
        return sum(1 for ok, _ in stored if ok)

    async def query(self, client: SimPeer, key: bytes) -> tuple[set[int], Lookup]:
        """``DhtClient.fetch`` (exhaustive): walk with k find_packets per round, again if it ran dry."""

        async def walk(seeds: list[Node]) -> Lookup:
            return await iterative_lookup(seeds, key, self.config.ksize, self.config.walk_alpha,
                                          ask=lambda n: self.call(client, n, "find_packets", key),
                                          nodes_of=named_nodes, self_id=client.node.id)

        async def reseed() -> list[Node]:
            if not client.contacts():
                await self.join(client, self.rng.sample(self.live(), min(2, len(self.live()))))
            return client.closest_contacts(key, SEED_LIMIT)

        lookup = await lookup_until_found(walk, client.closest_contacts(key, SEED_LIMIT), self.config.ksize, holds_packets, reseed)
        found: set[int] = set()
        for _, reply in lookup.replies.values():
            if holds_packets(reply):
                found.update(reply["packets"])
        return found, lookup


class _HeadAnswers:
    """The routing table's protocol while a constructed table is filled or offered a newcomer: the
    ping of a full bucket's head answers at once if the head is alive (nothing changes, the newcomer
    stays in the replacement cache) and fails if it departed (the head is removed and the newest
    replacement takes its place), as ``SimNetwork.call`` would conclude; what is left out is the
    pinged head welcoming the pinger in turn, which over tables that are all full sets off a chain
    of pings with no bearing on the tables a lookup uses."""

    def __init__(self, peer: SimPeer) -> None:
        self.peer = peer

    def call_ping(self, node: Node) -> asyncio.Future:
        head = self.peer.net.peers.get((node.ip, node.port))
        ok = head is not None and head.alive
        if not ok:
            self.peer.router.remove_contact(node)
        answered = self.peer.net.loop.create_future()
        answered.set_result((ok, node.id if ok else None))
        return answered


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def experiment(n: int, *, churn: float = 0.1, keys: int = 100, packets_per_key: int = 5,
               config: SimConfig | None = None, build: str = "join") -> dict:
    """Build an ``n``-node network, publish ``keys`` keys of ``packets_per_key`` packets, let
    ``churn`` of the nodes leave and as many new ones join, then query every key from a fresh
    client. Recall = packets found / packets published; hops = sequential rounds of the query.

    ``build="join"``: every node joins by the real join, before and after churn. ``"converged"``:
    the network starts from converged tables (:meth:`SimNetwork.build_converged`) and the newcomers
    after churn join the constructed way (:meth:`SimNetwork.join_converged`); publish, churn and
    queries are the same real code either way."""
    if build not in BUILDS:
        raise ValueError(f"build must be one of {BUILDS}, not {build!r}")
    config = config or SimConfig()
    started = time.process_time()
    net = SimNetwork(config)
    try:
        if build == "converged":
            net.build_converged(n)
        else:
            net.run(net.grow(n))
        build_rpcs = net.rpcs
        rng = random.Random(config.seed + 1)
        key_ids = [rng.getrandbits(160).to_bytes(20, "big") for _ in range(keys)]
        published = {k: list(range(i * packets_per_key, (i + 1) * packets_per_key)) for i, k in enumerate(key_ids)}

        async def publish_all() -> list[int]:
            writer = await net.client()
            return list(await asyncio.gather(*(net.publish(writer, k, p) for k, p in published.items())))

        replicas = net.run(publish_all())
        left, joining = net.churn(churn)
        if build == "converged":
            net.join_converged(joining)
        else:
            net.run(net.grow(joining))
        rpcs0, timeouts0 = net.rpcs, net.timeouts

        async def query_all() -> list[tuple[float, set[int], Lookup]]:
            reader = await net.client()
            out = []
            for k in key_ids:  # one at a time, so each query's virtual duration is its own
                t0 = net.loop.time()
                found, lookup = await net.query(reader, k)
                out.append((net.loop.time() - t0, found, lookup))
            return out

        results = net.run(query_all())
        live_at_query = len(net.live())
    finally:
        net.close()
    hops = [lk.hops for _, _, lk in results]
    recall = sum(len(found & set(published[k])) for k, (_, found, _) in zip(key_ids, results)) / (keys * packets_per_key)
    log2n = math.log2(n)
    return {
        "nodes": n,
        "build": build,
        "live_at_query": live_at_query,
        "left": left,
        "joined_after_publish": joining,
        "keys": keys,
        "packets": keys * packets_per_key,
        "recall": round(recall, 4),
        "keys_fully_found": sum(1 for k, (_, found, _) in zip(key_ids, results) if set(published[k]) <= found),
        "replicas_min": min(replicas),
        "replicas_mean": round(statistics.mean(replicas), 2),
        "hops_mean": round(statistics.mean(hops), 2),
        "hops_p95": _percentile(hops, 0.95),
        "hops_max": max(hops),
        "log2_n": round(log2n, 2),
        "hops_per_log2_n": round(statistics.mean(hops) / log2n, 3) if log2n else None,
        "rpcs_per_query": round(statistics.mean(lk.asked for _, _, lk in results), 1),
        "dead_per_query": round(statistics.mean(len(lk.dead) for _, _, lk in results), 2),
        "query_timeouts": net.timeouts - timeouts0,
        "query_rpcs": net.rpcs - rpcs0,
        "virtual_ms_per_query_median": round(1000 * statistics.median(t for t, _, _ in results), 1),
        "build_rpcs_per_node": round(build_rpcs / n, 1),
        "cpu_s": round(time.process_time() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
