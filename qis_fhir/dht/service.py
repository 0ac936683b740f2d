"""Running one node until SIGTERM/SIGINT: what ``qis-fhir node`` does, callable from tests too."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from qis_fhir.dht.address import format_address
from qis_fhir.dht.certs import CertChecker, load_identity
from qis_fhir.dht.logs import SUMMARY_INTERVAL, write_summaries
from qis_fhir.dht.node import STORE_FILE, DhtNode, NodeConfig, read_node_state, write_node_state
from qis_fhir.dht.rounds import RoundGate
from qis_fhir.dht.storage import PacketStore
from qis_fhir.dht.trust import ManifestVerifier

log = logging.getLogger("qis_fhir.dht.node")


def open_node(config: NodeConfig, data_dir: Path, manifest_path: Path) -> DhtNode:
    """The node of ``data_dir``: its store, its verifier over the manifest (pinned, purging what the
    manifest revokes) and its certified identity; what ``serve`` runs and what the bench starts in-process."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    storage = PacketStore(data_dir / STORE_FILE)

    def purge(key_ids: set[str]) -> None:
        removed = storage.remove_key_ids(key_ids)
        log.info("manifest revoked %d key(s): purged %d packets", len(key_ids), removed)

    try:
        verifier = ManifestVerifier(
            manifest_path, replay=storage.replay_view(), on_revoked=purge, pinned_state=data_dir / "manifest_pin.json"
        )
        identity = load_identity(data_dir, verifier.manifest)
    except BaseException:
        storage.close()
        raise
    purge_now = storage.key_ids() & set(verifier.manifest.revoked_key_ids)
    if purge_now:
        purge(purge_now)
    # secure-aggregation round chunks are checked by the round rules, every other wire by the verifier
    return DhtNode(config, RoundGate(verifier, storage.replay_view()), storage, identity=identity, checker=CertChecker(lambda: verifier.manifest, refresh=lambda: verifier.refresh(force=True)))


async def serve(config: NodeConfig, data_dir: Path, manifest_path: Path, stop: asyncio.Event | None = None) -> None:
    """Open the store, bind, join, keep up until ``stop`` is set (or SIGTERM/SIGINT), then close cleanly."""
    data_dir = Path(data_dir)
    node = open_node(config, data_dir, manifest_path)
    storage = node.storage
    state = read_node_state(data_dir)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests running serve in a thread)
            pass
    await node.listen()
    write_node_state(data_dir, node)
    log.info(
        "node %s listening on %s (ksize %d, %d packets held, data dir %s)",
        node.node.id.hex()[:12], format_address(node.host, node.port), node.ksize, storage.count(), data_dir,
    )
    saved = [(str(h), int(p)) for h, p in state.get("neighbors", []) if isinstance(p, int)]
    peers = list(dict.fromkeys([*config.bootstrap, *saved]))
    peers = [p for p in peers if p != (node.host, node.port)]
    node.on_upkeep.append(lambda: write_node_state(data_dir, node, joined=True))

    async def run() -> None:
        if peers:
            # a busy bootstrap peer may miss our pings: retry with backoff (bounded) before settling
            # for the upkeep loop's re-join
            for delay in (0.5, 1.0, 2.0, 4.0, 8.0):
                if await node.join(peers) > 0:
                    break
                write_node_state(data_dir, node)
                await asyncio.sleep(delay)
        write_node_state(data_dir, node, joined=True)
        await node._upkeep_loop()

    async def summaries() -> None:  # counts of the log lines the rate limit held back
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL)
            write_summaries()
            if node.protocol is not None:
                node.protocol.log_dropped()

    task = asyncio.ensure_future(run())
    summary_task = asyncio.ensure_future(summaries())
    try:
        await stop.wait()
    finally:
        log.info("stopping node on %s", format_address(node.host, node.port))
        task.cancel()
        summary_task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        write_summaries()
        write_node_state(data_dir, node)
        node.close()
        log.info("stopped")
