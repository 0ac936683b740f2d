"""DHT node processes on this machine: start, restart, kill and stop them by process id; and nodes
in one event loop on a settable clock, for secure-aggregation rounds run window by window.

Used by ``qis-fhir demo``, the round benchmark and the tests. Each node is ``sys.executable -m qis_fhir node`` bound to
``LOOPBACK`` port 0 and writes its bound port to ``DATA_DIR/node.json``; ``stop_all`` stops every
process it started (SIGTERM, then SIGKILL after a grace period), so callers use it in ``finally``.

Every node needs a node certificate. By default the cluster is its network's node operator: it makes
operator sites (``root/operators/operator-N``), adds them to the network with the governance key
beside the manifest (``network add-site``), and certifies each node at the next free index of one
of them (``max_nodes_per_site`` each); ``issue_certs`` is that step alone, for the bench's workers.

``wait_for_json`` and ``stop_processes`` are the two halves of that by-pid management; the DHT
bench (``qis_fhir.bench.dht``) starts its multi-node worker processes with them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qis_fhir.dht.address import format_addresses
from qis_fhir.dht.certs import NodeCert, NodeIdentity, issue_cert, write_node_cert

LOOPBACK = "127.0.0.1"  # what local nodes, and the clients that talk to them, bind: nothing off this machine reaches them
START_TIMEOUT = 60.0
STOP_GRACE = 10.0


def wait_for_json(path: Path, proc: subprocess.Popen, deadline: float, name: str, *,
                  ready: Callable[[Any], bool] = lambda data: True, log: Path | None = None) -> Any:
    """Poll until ``path`` holds JSON that ``ready`` accepts and return it; raise RuntimeError when
    ``proc`` exits first and TimeoutError at ``deadline`` (both quoting the end of ``log``)."""

    def tail() -> str:
        return f": {log.read_text()[-2000:]}" if log is not None and log.exists() else ""

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}{tail()}")
        try:
            data = json.loads(path.read_text())
            if ready(data):
                return data
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{name} did not get ready (no {path.name}){tail()}")


def stop_processes(procs: list[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """SIGTERM every running process, wait up to ``grace`` seconds in all, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class CertIssuer:
    """Certifies node directories one after another, adding operator sites to the network as each
    one's ``max_nodes_per_site`` indexes run out (the governance key must sit beside the manifest)."""

    def __init__(self, manifest: Path, root: Path) -> None:
        self.manifest = Path(manifest)
        self.root = Path(root)
        self._site: Any = None
        self._next = 0
        self._bound = 0
        self._sites = 0

    def _slot(self) -> tuple[Any, int]:
        """The next (operator site, index) with room under the manifest's bound."""
        from qis_fhir.packets.keys import create_site
        from qis_fhir.packets.manifest import add_site

        if self._site is None or self._next >= self._bound:
            site_dir = self.root / f"operator-{self._sites}"
            while site_dir.exists():  # a second cluster on the same root: a site of its own
                self._sites += 1
                site_dir = self.root / f"operator-{self._sites}"
            self._site = create_site(f"dht-operator-{os.urandom(3).hex()}", site_dir)
            self._sites += 1
            self._bound = add_site(self.manifest.parent, site_dir).max_nodes_per_site
            self._next = 0
        self._next += 1
        return self._site, self._next - 1

    def certify(self, node_dir: Path) -> NodeCert:
        """Write ``node_dir/node_key.pem`` and ``node_cert.json`` for a node process."""
        from qis_fhir.packets.manifest import load_manifest

        site, index = self._slot()
        return write_node_cert(node_dir, site, load_manifest(self.manifest), index)

    def identity(self) -> NodeIdentity:
        """A certified identity held in memory only (nodes started inside this process)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from qis_fhir.packets.keys import raw_public
        from qis_fhir.packets.manifest import load_manifest

        site, index = self._slot()
        key = Ed25519PrivateKey.generate()
        return NodeIdentity(key, issue_cert(site, load_manifest(self.manifest), index, raw_public(key.public_key())))


def issue_certs(manifest: Path, root: Path, node_dirs: list[Path]) -> list[NodeCert]:
    """Certify every directory of ``node_dirs`` (see :class:`CertIssuer`)."""
    issuer = CertIssuer(manifest, root)
    return [issuer.certify(d) for d in node_dirs]


@dataclass
class NodeProc:
    index: int
    data_dir: Path
    proc: subprocess.Popen | None = None
    port: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        return (LOOPBACK, self.port)


class LocalCluster:
    def __init__(self, root: Path, manifest: Path, *, ksize: int = 5, extra: list[str] | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.ksize = ksize
        self.extra = extra or []
        self.nodes: list[NodeProc] = []
        self.issuer = CertIssuer(manifest, root / "operators")

    def _spawn(self, node: NodeProc, bootstrap: list[tuple[str, int]]) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        if not (node.data_dir / "node_cert.json").exists():
            self.issuer.certify(node.data_dir)
        cmd = [sys.executable, "-m", "qis_fhir", "node", "--listen", f"{LOOPBACK}:0", "--data-dir", str(node.data_dir),
               "--network", str(self.manifest), "--ksize", str(self.ksize), "--rpc-timeout", "2", *self.extra]
        if bootstrap:
            cmd += ["--bootstrap", format_addresses(bootstrap)]
        log = open(node.data_dir / "stdout.log", "ab")
        node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def _wait_state(self, node: NodeProc, deadline: float, ready: Callable[[dict], bool]) -> dict:
        """node.json once written by this process (pid matches: a restarted node keeps the old file) and ``ready``."""
        return wait_for_json(node.data_dir / "node.json", node.proc, deadline, f"node {node.index}",
                             ready=lambda d: d.get("pid") == node.proc.pid and ready(d), log=node.data_dir / "stdout.log")

    def _wait_port(self, node: NodeProc, deadline: float) -> None:
        node.port = int(self._wait_state(node, deadline, lambda d: bool(d.get("port")))["port"])

    def start(self, n: int) -> list[NodeProc]:
        """Start n nodes: the first alone, the rest bootstrapping from the first (and one other)."""
        deadline = time.monotonic() + START_TIMEOUT
        new = []
        for _ in range(n):
            node = NodeProc(len(self.nodes), self.root / f"node{len(self.nodes):02d}")
            self.nodes.append(node)
            new.append(node)
            live = [x for x in self.nodes if x.port is not None and x.proc and x.proc.poll() is None]
            boot = [live[0].address] + ([live[-1].address] if len(live) > 1 else []) if live else []
            self._spawn(node, boot)
            if not live:
                self._wait_port(node, deadline)
        for node in new:
            if node.port is None:
                self._wait_port(node, deadline)
        return new

    def wait_joined(self, timeout: float = 30.0) -> None:
        """Until every live node's node.json says its join finished."""
        deadline = time.monotonic() + timeout
        for node in self.live():
            first = node.index == 0  # the first node has no one to join
            self._wait_state(node, deadline, lambda d, first=first: bool(d.get("joined") and (d.get("neighbors") or first)))

    def live(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def kill(self, node: NodeProc) -> None:
        """Hard stop (SIGKILL): the node gets no chance to say goodbye."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)

    def restart(self, node: NodeProc, bootstrap: list[tuple[str, int]]) -> None:
        node.port = None
        self._spawn(node, bootstrap)
        self._wait_port(node, time.monotonic() + START_TIMEOUT)

    def stop_all(self) -> None:
        stop_processes([node.proc for node in self.nodes if node.proc is not None])


class Clock:
    """A settable clock for round rules (nodes' ``RoundGate``, boards, steps): tests and the round
    benchmark move it from window to window instead of waiting for days."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def certify_nodes(manifest: Path, n: int) -> list[NodeIdentity]:
    """``n`` node identities held in memory, certified by an operator site added to the network (its
    governance key beside ``manifest``) whose own key is thrown away once they are issued. Call it
    before loading the manifest that clients of these nodes check certificates against."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qis-node-operators-") as root:
        issuer = CertIssuer(manifest, Path(root))
        return [issuer.identity() for _ in range(n)]


async def start_round_nodes(manifest: Path, clock: Callable[[], float], identities: list[NodeIdentity], ksize: int) -> list:
    """One node per certified identity (see :func:`certify_nodes`) in this event loop (real UDP on
    127.0.0.1, the nodes' own protocol and storage) whose round rules run on ``clock``; the caller
    closes them."""
    from qis_fhir.dht.certs import CertChecker
    from qis_fhir.dht.node import DhtNode, NodeConfig
    from qis_fhir.dht.rounds import RoundGate
    from qis_fhir.dht.storage import PacketStore
    from qis_fhir.dht.trust import ManifestVerifier

    nodes: list = []
    for identity in identities:
        store = PacketStore(":memory:")
        verifier = ManifestVerifier(manifest, replay=store.replay_view())
        gate = RoundGate(verifier, store.replay_view(), clock=clock)
        checker = CertChecker(lambda v=verifier: v.manifest, refresh=lambda v=verifier: v.refresh(force=True))
        node = DhtNode(NodeConfig(host=LOOPBACK, ksize=ksize, maintenance_interval=3600), gate, store, identity=identity, checker=checker)
        await node.start([(nodes[0].host, nodes[0].port)] if nodes else [])
        nodes.append(node)
    return nodes


@contextlib.contextmanager
def round_nodes_in_thread(manifest: Path, clock: Callable[[], float], identities: list[NodeIdentity], ksize: int) -> Iterator[list[tuple[str, int]]]:
    """:func:`start_round_nodes` in an event loop of their own thread, for code that runs its own
    ``asyncio.run`` (the round steps); yields their addresses, closes them and ends the thread on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    nodes: list = []
    try:
        nodes = asyncio.run_coroutine_threadsafe(start_round_nodes(manifest, clock, identities, ksize), loop).result(timeout=60)
        yield [(node.host, node.port) for node in nodes]
    finally:
        async def close() -> None:
            for node in nodes:
                node.close()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
