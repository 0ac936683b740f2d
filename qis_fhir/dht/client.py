"""Library API: publish packets to the DHT and query a fingerprint, from sync or async code.

The client does not run a long-lived node: a :class:`DhtClient` binds one short-lived peer (``bind``,
by default every local address on a free port, so it can reach nodes on other machines; replies come
back to that port), bootstraps from the given nodes, and talks to the network with an empty node
id, so no node ever adds it to a routing table (a departed client would otherwise cost every later
lookup a timeout).

``publish`` verifies every packet locally first (nothing invalid leaves the site), groups packets by
fingerprint key, finds each key's ``ksize`` closest nodes, and stores batches that fit the RPC cap
on each of them, counting per packet how many replicas confirmed it (``stored`` or ``held``), and
which refused it and why. ``query`` walks to the key's closest nodes collecting each one's first
page, fetches further pages from one node per distinct content digest, then verifies every packet
again (a node's word is never trusted) and keeps the highest sequence per (site, packet id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kademlia.node import Node

from qis_fhir.dht.address import client_bind, format_addresses, parse_addresses
from qis_fhir.dht.keys import dht_key, is_fingerprint, unpack_nodes
from qis_fhir.dht.lookup import SEED_LIMIT, iterative_lookup, lookup_until_found
from qis_fhir.dht.node import DhtNode, NodeConfig
from qis_fhir.dht.protocol import valid_cursor
from qis_fhir.dht.storage import CONFIRMED, PacketStore
from qis_fhir.errors import NoPeersError, PacketsRejectedError, PublishIncompleteError, QisError
from qis_fhir.packets.newest import newest_per_packet

log = logging.getLogger("qis_fhir.dht.client")

# what a local verification failure means for the site that publishes (the verifier's reasons)
_REJECTED_HINTS = {
    "unknown_key": "the network manifest does not list this site's key: governance must `qis-fhir network add-site` it",
    "revoked_key": "the network manifest revokes this site's key: ask the network governance",
    "mapping_version": "the network does not accept this mapping version",
}

MAX_PAGES_PER_NODE = 10_000  # bounds a node that keeps answering "there is more"
DEFAULT_TTL = 30 * 86400.0


# ---------------------------------------------------------------------- results
@dataclass
class PacketReceipt:
    site_id: str
    packet_id: str
    fingerprint: str
    seq: int
    replicas: int = 0  # nodes that confirmed holding it
    asked: int = 0  # nodes asked to hold it
    refused: dict[str, int] = field(default_factory=dict)  # reason -> nodes ("no_reply", "replay", ...)


@dataclass
class PublishReport:
    receipts: list[PacketReceipt]
    rejected_locally: dict[str, int]  # packets not sent: failed local verification, by reason
    superseded_locally: int  # older seqs of a (site, packet id) also in the input: not sent
    nodes_contacted: int
    elapsed_s: float
    rpcs: int = 0  # RPCs sent (retries included)
    rpc_timeouts: int = 0  # of which got no reply in time

    @property
    def confirmed(self) -> int:
        return sum(1 for r in self.receipts if r.replicas > 0)

    @property
    def unconfirmed(self) -> list[PacketReceipt]:
        return [r for r in self.receipts if r.replicas == 0]

    @property
    def min_replicas(self) -> int:
        return min((r.replicas for r in self.receipts), default=0)

    def raise_for_failure(self, report_path: Path | None = None) -> None:
        """The one publish policy, for ``qis-fhir publish`` and ``qis-fhir run --bootstrap`` alike: a
        publish succeeded only if every packet given was sent (none failed verification here) and
        every packet sent was confirmed by at least one replica.

        Raises ``PublishIncompleteError`` (12) when a sent packet was confirmed by no replica, else
        ``PacketsRejectedError`` (10) when a packet failed local verification and was never sent
        (a revoked or unknown site key rejects every packet: nothing is published at all). The
        message says how many, why, and what to do."""
        problems = []
        if self.unconfirmed:
            refused: Counter[str] = Counter()
            for r in self.unconfirmed:
                refused.update(r.refused)
            why = f" (nodes answered: {_counts(refused)})" if refused else ""
            problems.append(f"{len(self.unconfirmed)} of {len(self.receipts)} packets were confirmed by no replica{why}")
        rejected = sum(self.rejected_locally.values())
        if rejected:
            given = rejected + self.superseded_locally + len(self.receipts)
            hints = [h for reason, h in _REJECTED_HINTS.items() if reason in self.rejected_locally]
            problems.append(
                f"{rejected} of {given} packets failed verification here and were not published "
                f"({_counts(self.rejected_locally)})" + "".join(f"; {h}" for h in hints)
            )
        if not problems:
            return
        message = "; ".join(problems) + (f"; see {report_path}" if report_path is not None else "")
        raise (PublishIncompleteError if self.unconfirmed else PacketsRejectedError)(message)

    def to_dict(self) -> dict:
        hist = Counter(r.replicas for r in self.receipts)
        refused: Counter[str] = Counter()
        for r in self.receipts:
            refused.update(r.refused)
        return {
            "packets": len(self.receipts),
            "confirmed": self.confirmed,
            "unconfirmed": len(self.unconfirmed),
            "min_replicas": self.min_replicas,
            "replicas_histogram": {str(k): v for k, v in sorted(hist.items())},
            "refused_by_nodes": dict(sorted(refused.items())),
            "rejected_locally": dict(sorted(self.rejected_locally.items())),
            "superseded_locally": self.superseded_locally,
            "nodes_contacted": self.nodes_contacted,
            "rpcs": self.rpcs,
            "rpc_timeouts": self.rpc_timeouts,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class QueryResult:
    fingerprint: str
    packets: list[Any]  # verified Packets, one per (site, packet id) at its highest seq
    wires: list[bytes]  # their wire bytes, same order
    rejected: dict[str, int]  # received but failed verification here, by reason
    hops: int  # sequential rounds of the lookup
    nodes_asked: int  # find_packets RPCs in the lookup
    nodes_answered: int
    holders: int  # nodes that held at least one packet for the key
    pages: int  # further page RPCs after the lookup
    elapsed_s: float

    def to_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "packets": len(self.packets),
            "sites": sorted({p.site_id for p in self.packets}),
            "rejected": dict(sorted(self.rejected.items())),
            "hops": self.hops,
            "nodes_asked": self.nodes_asked,
            "nodes_answered": self.nodes_answered,
            "holders": self.holders,
            "pages": self.pages,
            "elapsed_s": round(self.elapsed_s, 4),
        }


# ---------------------------------------------------------------------- helpers
def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


def _as_addresses(bootstrap: Any) -> list[tuple[str, int]]:
    if isinstance(bootstrap, str):
        return parse_addresses(bootstrap)
    return [(str(h), int(p)) for h, p in bootstrap]


def _load_manifest(manifest: Any) -> Any:
    if isinstance(manifest, (str, Path)):
        from qis_fhir.packets.manifest import load_manifest

        return load_manifest(manifest)
    return manifest


def _wire_of(packet: Any) -> bytes:
    if isinstance(packet, (bytes, bytearray)):
        return bytes(packet)
    from qis_fhir.packets.codec import encode_packet

    return encode_packet(packet)


def _wires_of(reply: dict) -> list[bytes]:
    return [w for w in reply.get("packets") or [] if isinstance(w, bytes)]


async def _read_pages(ask: Any, cursor: list | None, add: Any) -> tuple[bool | None, int]:
    """Follow one node's pages from ``cursor`` (``ask(cursor) -> (ok, reply)``), passing each page's
    wires to ``add``. Returns (True: read to the end, False: the node stopped answering, None: it gave a
    cursor that is malformed or does not advance, or MAX_PAGES_PER_NODE ran out) and the RPCs sent."""
    for pages in range(1, MAX_PAGES_PER_NODE + 1):
        ok, reply = await ask(cursor)
        if not ok or not isinstance(reply, dict):
            return False, pages
        add(_wires_of(reply))
        nxt = reply.get("next")
        if nxt is None:
            return True, pages
        if not valid_cursor(nxt) or (cursor is not None and nxt <= cursor):
            return None, pages  # a cursor is [site id, packet id] and must advance
        cursor = nxt
    return None, MAX_PAGES_PER_NODE


def holds_packets(reply: object) -> bool:
    """A find_packets reply from a node that holds packets for the key."""
    return isinstance(reply, dict) and bool(reply.get("count"))


def named_nodes(reply: object) -> list:
    """Node triples a find_packets reply names (packed IPv4 records and plain triples)."""
    if not isinstance(reply, dict):
        return []
    nodes = unpack_nodes(reply.get("n4", b""))
    if isinstance(reply.get("nodes"), list):
        nodes.extend(reply["nodes"])
    return nodes


# ---------------------------------------------------------------------- client
class DhtClient:
    """``async with DhtClient(bootstrap, manifest) as c: await c.publish(...); await c.query(...)``.

    ``bind``: where the client's socket binds, ``"HOST[:PORT]"`` or (host, port); by default every
    local address (``0.0.0.0``, or ``::`` for IPv6 peers) on a free port. Tests pass 127.0.0.1."""

    def __init__(
        self,
        bootstrap: Any,
        manifest: Any,
        *,
        ksize: int = 20,
        alpha: int = 3,
        ttl: float = DEFAULT_TTL,
        rpc_timeout: float = 3.0,
        retries: int = 1,
        max_inflight: int = 32,
        key_concurrency: int = 8,
        query_alpha: int | None = None,
        quorum: int | None = None,
        bind: Any = None,
    ) -> None:
        from qis_fhir.packets.verifier import Verifier

        self.bootstrap = _as_addresses(bootstrap)
        host, port = client_bind(bind, self.bootstrap)  # "HOST[:PORT]" or (host, port); None: any address
        self.manifest = _load_manifest(manifest)
        self._verifier = Verifier(self.manifest)
        self.ttl = ttl
        self.key_concurrency = key_concurrency
        # a query must reach all k closest nodes anyway (every replica may hold a different site's
        # packet), so it asks up to k of them per round instead of alpha: fewer sequential rounds
        self.query_alpha = query_alpha or max(alpha, ksize)
        # quorum=q: stop once the q closest known nodes have all answered with the same non-empty
        # content digest (see docs/dht.md, "Reading"); None: ask every one of the k closest
        self.quorum = quorum
        self.config = NodeConfig(host=host, port=port, ksize=ksize, alpha=alpha, rpc_timeout=rpc_timeout, retries=retries, max_inflight=max_inflight, ttl=ttl)
        self.peer: DhtNode | None = None

    async def __aenter__(self) -> DhtClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def start(self) -> None:
        if not self.bootstrap:
            raise NoPeersError("no bootstrap peers given (--bootstrap HOST:PORT)")
        from qis_fhir.dht.certs import CertChecker

        storage = PacketStore(":memory:", verify=self._verifier.check)
        self.peer = DhtNode(self.config, self._verifier.check, storage, checker=CertChecker(self.manifest), announce=False)
        try:
            known = await self.peer.start(self.bootstrap)
        except BaseException:  # cannot bind, or cancelled: release the socket and store
            self.close()
            raise
        if known == 0:
            self.close()
            raise NoPeersError(f"no DHT peer answered at {format_addresses(self.bootstrap)}")

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    async def _ensure_contacts(self) -> None:
        """A short-lived client can lose its few contacts to one slow reply: ask the bootstrap again."""
        if not self.peer.contacts() and await self.peer.join(self.bootstrap) == 0:
            raise NoPeersError(f"no DHT peer answers any more at {format_addresses(self.bootstrap)}")

    @property
    def protocol(self) -> Any:
        assert self.peer is not None, "DhtClient not started"
        return self.peer.protocol

    # ------------------------------------------------------------------ publish
    async def publish(self, packets: list[Any]) -> PublishReport:
        started = time.perf_counter()
        sent0, failed0 = self.protocol.rpc_sent, self.protocol.rpc_failed
        rejected: Counter[str] = Counter()
        verified = []
        for packet in packets:
            wire = _wire_of(packet)
            verdict = self._verifier.check(wire)
            if not verdict.ok:
                rejected[verdict.reason] += 1
                continue
            verified.append((verdict.packet, wire))
        kept, superseded = newest_per_packet(verified)
        by_key: dict[bytes, list[tuple[PacketReceipt, bytes]]] = {}
        receipts = []
        for p, wire in kept:
            receipt = PacketReceipt(p.site_id, p.packet_id, p.fingerprint, p.seq)
            receipts.append(receipt)
            by_key.setdefault(dht_key(p.fingerprint), []).append((receipt, wire))
        contacted: set[bytes] = set()
        slots = asyncio.Semaphore(self.key_concurrency)

        async def one(key: bytes, entries: list[tuple[PacketReceipt, bytes]]) -> None:
            async with slots:
                results, replied = await self.store_items(key, [[wire, self.ttl] for _, wire in entries])
                contacted.update(replied)
                for statuses in results:
                    for (receipt, _), status in zip(entries, statuses):
                        receipt.asked += 1
                        if status in CONFIRMED:
                            receipt.replicas += 1
                        else:
                            receipt.refused[status] = receipt.refused.get(status, 0) + 1

        await asyncio.gather(*(one(k, e) for k, e in by_key.items()))
        return PublishReport(
            receipts, dict(rejected), superseded, len(contacted), time.perf_counter() - started,
            rpcs=self.protocol.rpc_sent - sent0, rpc_timeouts=self.protocol.rpc_failed - failed0,
        )

    async def store_items(self, key: bytes, items: list[list]) -> tuple[list[list[str]], set[bytes]]:
        """Store ``[wire, ttl]`` items under ``key`` on its ``ksize`` closest live nodes: one status list
        per node asked (what ``send_packets`` answers) and the ids of the nodes the lookup heard from.
        Items are not verified here: the caller's job (``publish`` verifies packets, the round board
        seals its own chunks)."""
        await self._ensure_contacts()
        lookup = await self.peer.closest_nodes(key)
        results = await asyncio.gather(*(self.protocol.send_packets(n, key, items) for n in lookup.closest))
        return list(results), set(lookup.replies)

    # ------------------------------------------------------------------ query
    async def fetch(self, fingerprint: str) -> tuple[set[bytes], dict]:
        """Raw wires for ``fingerprint`` from its closest nodes, unverified, with lookup figures."""
        key = dht_key(fingerprint)
        proto = self.protocol
        await self._ensure_contacts()
        seeds = proto.closest_contacts(key, SEED_LIMIT)
        q = self.quorum

        def agreed(closest: list[Node], replies: dict) -> bool:
            top = closest[:q]
            if len(top) < q or any(n.id not in replies for n in top):
                return False
            answers = [replies[n.id][1] for n in top]
            if not all(isinstance(a, dict) and a.get("count") for a in answers):
                return False
            return len({(a.get("count"), a.get("digest")) for a in answers}) == 1

        async def walk(seeds: list[Node]) -> Any:
            return await iterative_lookup(
                seeds,
                key,
                self.peer.ksize,
                q if q else self.query_alpha,
                ask=lambda n: proto.call_find_packets(n, key, None),
                nodes_of=named_nodes,
                self_id=self.peer.node.id,
                done=agreed if q else None,
            )

        async def reseed() -> list[Node]:
            await self._ensure_contacts()
            return proto.closest_contacts(key, SEED_LIMIT)

        lookup = await lookup_until_found(walk, seeds, self.peer.ksize, holds_packets, reseed)
        wires: set[bytes] = set()
        more: dict[bytes, list[tuple[Node, list]]] = {}
        holders = 0
        for node, reply in lookup.replies.values():
            if not holds_packets(reply):
                continue
            holders += 1
            wires.update(_wires_of(reply))
            nxt = reply.get("next")
            if nxt is not None:
                digest = reply.get("digest") if isinstance(reply.get("digest"), bytes) else node.id
                more.setdefault(digest, []).append((node, nxt))
        pages = 0

        async def drain(candidates: list[tuple[Node, list]]) -> None:
            nonlocal pages
            for node, cursor in candidates:  # one node per digest; the next only if this one fails
                complete, sent = await _read_pages(lambda c, node=node: proto.call_find_packets(node, key, c), cursor, wires.update)
                pages += sent
                if complete:
                    return

        await asyncio.gather(*(drain(c) for c in more.values()))
        figures = {"hops": lookup.hops, "asked": lookup.asked, "answered": len(lookup.replies), "holders": holders, "pages": pages}
        return wires, figures

    async def query(self, fingerprint: str) -> QueryResult:
        if not is_fingerprint(fingerprint):
            raise QisError("a fingerprint is 64 lower-case hex characters", exit_code=2)
        started = time.perf_counter()
        wires, fig = await self.fetch(fingerprint)
        rejected: Counter[str] = Counter()
        verified = []
        for wire in wires:
            verdict = self._verifier.check(wire)
            if not verdict.ok:
                rejected[verdict.reason] += 1
                continue
            if verdict.packet.fingerprint != fingerprint:
                rejected["wrong_fingerprint"] += 1
                continue
            verified.append((verdict.packet, wire))
        chosen, _ = newest_per_packet(verified)  # the rule every node applies, so replicas converge
        return QueryResult(
            fingerprint=fingerprint,
            packets=[p for p, _ in chosen],
            wires=[w for _, w in chosen],
            rejected=dict(rejected),
            hops=fig["hops"],
            nodes_asked=fig["asked"],
            nodes_answered=fig["answered"],
            holders=fig["holders"],
            pages=fig["pages"],
            elapsed_s=time.perf_counter() - started,
        )

    async def query_many(self, fingerprints: list[str], concurrency: int = 8) -> dict[str, QueryResult]:
        slots = asyncio.Semaphore(concurrency)

        async def one(fp: str) -> QueryResult:
            async with slots:
                return await self.query(fp)

        results = await asyncio.gather(*(one(fp) for fp in fingerprints))
        return dict(zip(fingerprints, results))

    async def node_holdings(self, address: tuple[str, int], fingerprint: str) -> list[bytes] | None:
        """Every wire one node holds for ``fingerprint`` (all pages), or None if it does not answer.

        For operators and tests checking where packets are; unverified."""
        key = dht_key(fingerprint)
        out: list[bytes] = []
        complete, _ = await _read_pages(lambda c: self.protocol._call("find_packets", address, b"", key, c), None, out.extend)
        return None if complete is False else out

    async def node_stats(self, address: tuple[str, int]) -> dict | None:
        ok, reply = await self.protocol.call_stats(address)
        return reply if ok and isinstance(reply, dict) else None


# ---------------------------------------------------------------------- module-level API
async def publish_async(packets: list[Any], bootstrap: Any, manifest: Any, **options: Any) -> PublishReport:
    """Publish ``packets`` (wire bytes or Packet objects); raises NoPeersError when no peer answers."""
    async with DhtClient(bootstrap, manifest, **options) as client:
        return await client.publish(packets)


def publish(packets: list[Any], bootstrap: Any, manifest: Any, **options: Any) -> PublishReport:
    """Blocking :func:`publish_async` (runs its own event loop: call it from sync code only)."""
    return asyncio.run(publish_async(packets, bootstrap, manifest, **options))


async def query_async(fingerprint: str, bootstrap: Any, manifest: Any, **options: Any) -> QueryResult:
    async with DhtClient(bootstrap, manifest, **options) as client:
        return await client.query(fingerprint)


def query(fingerprint: str, bootstrap: Any, manifest: Any, **options: Any) -> QueryResult:
    """Blocking :func:`query_async`."""
    return asyncio.run(query_async(fingerprint, bootstrap, manifest, **options))


async def query_many_async(fingerprints: list[str], bootstrap: Any, manifest: Any, **options: Any) -> dict[str, QueryResult]:
    async with DhtClient(bootstrap, manifest, **options) as client:
        return await client.query_many(fingerprints)


def query_many(fingerprints: list[str], bootstrap: Any, manifest: Any, **options: Any) -> dict[str, QueryResult]:
    """Blocking: one client, many fingerprints (what synthesis needs)."""
    return asyncio.run(query_many_async(fingerprints, bootstrap, manifest, **options))
