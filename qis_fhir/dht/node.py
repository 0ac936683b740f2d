"""A long-running DHT node: the package's ``Server`` with our protocol, SQLite storage and upkeep.

Differences from the stock ``kademlia.network.Server``:

* it binds exactly the address it is given (``NodeConfig.host`` has no default; the stock
  ``listen`` binds ``0.0.0.0``) and reports the port it actually got (port 0 picks a free one);
* its id comes from its node certificate (``qis_fhir.dht.certs``: the issuing site's key id and the
  certificate's index), and it speaks only the authenticated wire (``qis_fhir.dht.session``);
* its last known neighbours persist in ``DATA_DIR/node.json``, so a restarted node takes its
  old place in the id space (its stored packets are the ones that belong there) and can rejoin even
  when its bootstrap peers are gone;
* upkeep runs in one bounded loop: expire old rows, republish keys nobody re-stored for
  ``republish_interval`` (with their *remaining* lifetime, so replicas never make a packet
  immortal), refresh lonely buckets, and re-bootstrap when the routing table is empty.
  The stock hourly refresh (which republishes through ``set_digest``) is not started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kademlia.network import Server
from kademlia.node import Node

from qis_fhir.dht.address import format_address
from qis_fhir.dht.certs import CertChecker, NodeIdentity
from qis_fhir.dht.limits import Limits
from qis_fhir.dht.lookup import SEED_LIMIT, Lookup, iterative_lookup, refresh_targets
from qis_fhir.dht.protocol import OPERATORS, PacketProtocol, Verify
from qis_fhir.dht.storage import PacketStore
from qis_fhir.errors import ExitCode, QisError
from qis_fhir.files import write_json

log = logging.getLogger("qis_fhir.dht.node")

NODE_JSON = "node.json"
STORE_FILE = "packets.sqlite3"
DAY = 86400.0
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class NodeConfig:
    host: str  # the one address bound (a node: --listen; a client: its --bind); no default on purpose
    port: int = 0
    bootstrap: tuple[tuple[str, int], ...] = ()
    ksize: int = 20
    alpha: int = 3
    ttl: float = 30 * DAY  # a packet expires this long after its origin last published it
    republish_interval: float = 3600.0  # a key nobody re-stored for this long is republished by its holder
    refresh_interval: float = 3600.0  # lonely buckets are refreshed this often
    maintenance_interval: float = 60.0  # how often upkeep looks for due work
    rpc_timeout: float = 3.0
    retries: int = 1  # a timed-out RPC is sent once more before the peer counts as gone
    max_inflight: int = 32  # outgoing RPCs in flight at once (per node or client)
    handshake_rate: float = 200.0  # handshakes this node answers per second at most (the responder's share of one costs ~0.3 ms of CPU)
    republish_concurrency: int = 4  # keys republished at once
    limits: Limits = Limits()  # what unauthenticated peers may cost (qis_fhir.dht.limits)
    operators: tuple[str, ...] = OPERATORS  # addresses whose stats requests are answered


def _random_id() -> bytes:
    return random.SystemRandom().getrandbits(160).to_bytes(20, "big")


class DhtNode(Server):
    """A node (``announce=True``) or a short-lived client peer (``announce=False``, never routed to)."""

    protocol_class = PacketProtocol

    def __init__(
        self,
        config: NodeConfig,
        verify: Verify,
        storage: PacketStore,
        *,
        identity: NodeIdentity | None = None,
        checker: CertChecker,
        announce: bool = True,
    ) -> None:
        """A node (``announce``) needs its ``identity``; a client has none. ``checker`` judges peers'
        certificates against the network manifest."""
        if announce and identity is None:
            raise ValueError("a DHT node needs a node certificate (qis_fhir.dht.certs.load_identity)")
        node_id = identity.node_id if identity is not None else _random_id()
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self.identity = identity
        self.checker = checker
        self.config = config
        self.verify = verify
        self.announce = announce
        self.host: str = config.host
        self.port: int | None = None
        self._upkeep: asyncio.Task | None = None
        self._last_refresh = time.monotonic()
        self._cert_warned = -1e9
        self.on_upkeep: list[Any] = []  # callables run after each upkeep pass (the node command saves state)

    # ------------------------------------------------------------------ lifecycle
    def _create_protocol(self) -> PacketProtocol:
        return self.protocol_class(
            self.node,
            self.storage,
            self.ksize,
            verify=self.verify,
            announce=self.announce,
            rpc_timeout=self.config.rpc_timeout,
            retries=self.config.retries,
            max_inflight=self.config.max_inflight,
            max_ttl=self.config.ttl,
            limits=self.config.limits,
            operators=self.config.operators,
            identity=self.identity,
            checker=self.checker,
            handshake_rate=self.config.handshake_rate,
        )

    async def listen(self, port: int | None = None, interface: str | None = None) -> None:  # type: ignore[override]
        """Bind ``interface:port`` (default: the config's host and port)."""
        host = interface or self.config.host
        port = self.config.port if port is None else port
        loop = asyncio.get_running_loop()
        try:
            self.transport, self.protocol = await loop.create_datagram_endpoint(self._create_protocol, local_addr=(host, port))
        except OSError as exc:  # not an address of this machine, or the port is taken
            raise QisError(f"cannot bind {format_address(host, port)}: {exc.strerror or exc}", exit_code=ExitCode.USAGE) from None
        self.host, self.port = self.transport.get_extra_info("sockname")[:2]

    async def start(self, bootstrap: list[tuple[str, int]] | None = None) -> int:
        """Listen, join the network, start upkeep (nodes only); returns the contacts known after joining."""
        await self.listen()
        peers = list(bootstrap if bootstrap is not None else self.config.bootstrap)
        known = await self.join(peers) if peers else 0
        if self.announce:
            self._upkeep = asyncio.ensure_future(self._upkeep_loop())
        return known

    def stop(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
        if self.protocol is not None:
            self.protocol.cancel_tasks()
            self.protocol.handoff.stop()
        super().stop()

    def close(self) -> None:
        """Stop, then close the node's storage (what every owner of a node does last)."""
        self.stop()
        if self.protocol is not None:
            self.protocol.save_counts()
        self.storage.close()

    # ------------------------------------------------------------------ routing
    def contacts(self) -> list[Node]:
        return [] if self.protocol is None else self.protocol.contacts()

    async def join(self, peers: list[tuple[str, int]]) -> int:
        """Ping ``peers``, look up our own id, then (a node, not a client) a random id in every
        subtree further away that we know fewer than k nodes of; returns contacts known."""
        found = await asyncio.gather(*(self.protocol.ping_address(tuple(p)) for p in peers))
        seeds = [n for n in found if n is not None]
        if seeds:
            await self.closest_nodes(self.node.id, seeds=seeds)
            if self.announce:  # fill the subtrees our own lookup never met (see refresh_targets)
                targets = refresh_targets(self.node.id, self.contacts(), self.ksize, random.SystemRandom())
                await asyncio.gather(*(self.closest_nodes(t) for t in targets))
        known = len(self.contacts())
        log.info("joined through %d of %d bootstrap peers; %d contacts", len(seeds), len(peers), known)
        return known

    async def closest_nodes(self, key: bytes, seeds: list[Node] | None = None) -> Lookup:
        """The ``ksize`` closest live nodes to ``key`` (iterative FIND_NODE)."""
        target = Node(key)
        if seeds is None:
            seeds = self.protocol.closest_contacts(key, SEED_LIMIT)
        return await iterative_lookup(
            seeds,
            key,
            self.ksize,
            self.alpha,
            ask=lambda n: self.protocol.call_find_node(n, target),
            nodes_of=lambda reply: reply,
            self_id=self.node.id,
        )

    # ------------------------------------------------------------------ upkeep
    async def _upkeep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval)
            try:
                await self.upkeep()
            except asyncio.CancelledError:
                raise
            except Exception:  # upkeep must outlive one bad pass
                log.exception("upkeep pass failed")

    async def upkeep(self) -> dict:
        """One pass: expire, re-join if alone, drop dead contacts, republish due keys, refresh lonely buckets."""
        self.protocol.save_counts()
        refresh = getattr(self.verify, "refresh", None)
        if refresh is not None:  # a revocation in a new manifest ends sessions and contacts below
            refresh()
        self.protocol.channel.prune()
        self._warn_if_certificate_expires()
        expired = self.storage.expire()
        if expired:
            log.info("expired %d packets", expired)
        if not self.contacts() and self.config.bootstrap:
            await self.join(list(self.config.bootstrap))
        await self.check_contacts()
        republished = await self.republish()
        if time.monotonic() - self._last_refresh >= self.config.refresh_interval:
            self._last_refresh = time.monotonic()
            await self.refresh()
        for hook in self.on_upkeep:
            hook()
        return {"expired": expired, "republished_keys": republished}

    def _warn_if_certificate_expires(self) -> None:
        """Once an hour in the last CERT_WARN_DAYS of the certificate: when it expires, every peer
        refuses this node and it silently leaves the network."""
        if self.identity is None:
            return
        left = self.identity.cert.expires - time.time()
        now = time.monotonic()
        if left < CERT_WARN_DAYS * DAY and now - self._cert_warned >= 3600:
            self._cert_warned = now
            log.warning("this node's certificate expires in %.1f days; its site re-issues it with qis-fhir node-cert", max(0.0, left / DAY))

    async def check_contacts(self) -> int:
        """Ping every contact once; one that does not answer (after the retry) leaves the table.

        The stock table drops a contact only when *this* node's own RPC to it fails, so a node that
        rarely looks anything up keeps handing out dead neighbours, and with a small k a reader's
        walk can run out of live nodes. Returns how many were dropped."""
        before = self.contacts()
        if not before:
            return 0
        await asyncio.gather(*(self.protocol.call_ping(n) for n in before))
        dropped = len(before) - len(self.contacts())
        if dropped:
            log.info("dropped %d unreachable contacts", dropped)
        return max(0, dropped)

    async def republish(self) -> int:
        """Store every key nobody re-stored for ``republish_interval`` on its current k closest nodes."""
        keys = self.storage.keys_due_for_republish(self.config.republish_interval)
        if not keys or not self.contacts():
            return 0
        slots = asyncio.Semaphore(self.config.republish_concurrency)

        async def one(key: bytes) -> None:
            async with slots:
                lookup = await self.closest_nodes(key)
                now = time.time()
                items = self.storage.items_to_pass_on(key, now)
                if items:
                    await asyncio.gather(*(self.protocol.send_packets(n, key, items) for n in lookup.closest))
                self.storage.mark_republished(key, now)

        await asyncio.gather(*(one(k) for k in keys))
        log.info("republished %d keys", len(keys))
        return len(keys)

    async def refresh(self) -> None:
        """Look up a random id in each bucket nobody touched for an hour (paper section 2.3)."""
        ids = self.protocol.get_refresh_ids()
        await asyncio.gather(*(self.closest_nodes(i) for i in ids))


# ---------------------------------------------------------------------- node.json
def read_node_state(data_dir: Path) -> dict:
    path = Path(data_dir) / NODE_JSON
    if not path.exists():
        return {}
    try:
        state = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        log.warning("%s is corrupt; starting with a new node id", path)
        return {}
    return state if isinstance(state, dict) else {}


def write_node_state(data_dir: Path, node: DhtNode, **extra: Any) -> None:
    """``node.json``: id, bound address, pid and neighbours (atomic replace; read by tests and restarts)."""
    state = {
        "node_id": node.node.id.hex(),
        "host": node.host,
        "port": node.port,
        "pid": os.getpid(),
        "neighbors": [[n.ip, n.port] for n in node.contacts()][: 4 * node.ksize],
        **extra,
    }
    write_json(Path(data_dir) / NODE_JSON, state)


def node_id_from_state(state: dict) -> bytes | None:
    value = state.get("node_id")
    if isinstance(value, str) and len(value) == 40:
        try:
            return bytes.fromhex(value)
        except ValueError:
            return None
    return None
