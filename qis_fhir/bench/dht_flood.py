"""``qis-fhir bench --only dhtflood``: what a flood of unauthenticated datagrams costs a node.

One real node process on 127.0.0.1 (and a second one, its certified peer) takes, for each kind of
datagram an outsider can send without any key, ``RATE`` datagrams a second for ``SECONDS`` seconds
from a sender process:

* ``junk``: random bytes of a type the wire does not know;
* ``data``: a sealed-looking DATA datagram under a random session index (a forged or stale session);
* ``hello``: a well-formed handshake HELLO (answered with a 21-byte cookie: the dearest path that
  needs no cookie, one HMAC and one ``sendto``);
* ``init``: a handshake INIT with a wrong cookie (one HMAC, then dropped before any public-key work).

The sender is one socket, so the node's gate (``qis_fhir.dht.limits``) passes its per-source rate
to the wire and drops the rest unread: the figures are those of the whole inbound path. Reported per kind: the node's CPU (user + system, from the kernel's accounting of its process) as a
fraction of one core, the datagrams it counted as dropped, so CPU per datagram, and whether the node
kept answering during the flood: every 0.2 s a client queries through it and a certified node pings it.

``wire_cpu``: what the authenticated wire costs honest traffic, in one process without sockets: a
mutual handshake (both sides, and the responder's share), sealing plus opening a 500-byte RPC, and a
store receipt for a batch of 15 packets signed and checked.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qis_fhir.dht.cluster import LOOPBACK

RATE = 20_000
SECONDS = 4.0
KINDS = ("junk", "data", "hello", "init")
BATCH_MS = 5


def _datagram(kind: str) -> bytes:
    if kind == "junk":
        return b"\x00" + os.urandom(60)
    if kind == "data":
        return struct.pack(">BIQ", 0x56, int.from_bytes(os.urandom(4), "big"), 0) + os.urandom(48)
    if kind == "hello":
        return (b"\x51" + os.urandom(36)).ljust(128, b"\0")
    return (b"\x53" + os.urandom(52)).ljust(320, b"\0")


def _send(kind: str, host: str, port: int, rate: int, seconds: float) -> None:
    """The sender process: ``rate`` datagrams a second in batches every BATCH_MS milliseconds."""
    pool = [_datagram(kind) for _ in range(256)]
    per_batch = max(1, rate * BATCH_MS // 1000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.setblocking(False)
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + per_batch
            while sent < due:
                try:
                    s.sendto(pool[sent & 255], (host, port))
                except BlockingIOError:
                    pass
                sent += 1
            time.sleep(BATCH_MS / 1000)
    print(sent)


async def _flood(target: Any, identity: Any, manifest: Path, fp: str, wire: bytes) -> dict:
    """Each kind in turn: the sender process floods ``target`` while, every 0.2 s, a client queries
    through it and a certified node (``identity``, in this process) pings it."""
    import psutil

    from qis_fhir.dht.certs import CertChecker
    from qis_fhir.dht.client import DhtClient
    from qis_fhir.dht.node import DhtNode, NodeConfig
    from qis_fhir.dht.storage import PacketStore
    from qis_fhir.dht.trust import ManifestVerifier

    store = PacketStore(":memory:")
    verifier = ManifestVerifier(manifest, replay=store.replay_view())
    peer = DhtNode(NodeConfig(host=LOOPBACK, ksize=2, maintenance_interval=3600), verifier, store, identity=identity,
                   checker=CertChecker(lambda: verifier.manifest))
    proc = psutil.Process(target.proc.pid)
    node = target.address
    out = {}
    try:
        await peer.listen()
        async with DhtClient([node], manifest, ksize=2, bind=LOOPBACK) as client:
            await client.publish([wire])
            for kind in KINDS:
                before = await client.node_stats(node)
                cpu0, t0 = proc.cpu_times(), time.monotonic()
                sender = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "qis_fhir.bench.dht_flood", "send", kind, LOOPBACK, str(target.port), str(RATE), str(SECONDS),
                    stdout=asyncio.subprocess.PIPE)
                queries = complete = answered = 0
                latencies = []
                while time.monotonic() < t0 + SECONDS:
                    t = time.perf_counter()
                    result = await client.query(fp)
                    latencies.append(time.perf_counter() - t)
                    queries += 1
                    complete += len(result.packets) == 1
                    answered += (await peer.protocol.ping_address(node)) is not None
                    await asyncio.sleep(0.2)
                sent = int((await sender.communicate())[0].strip() or 0)
                cpu1, wall = proc.cpu_times(), time.monotonic() - t0
                after = await client.node_stats(node)
                cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                handled = sum(after["dropped"].values()) - sum(before["dropped"].values()) + \
                    after["handshakes"].get("cookies_sent", 0) - before["handshakes"].get("cookies_sent", 0)
                out[kind] = {
                    "sent": sent,
                    "handled_by_node": handled,  # dropped, or answered with a cookie (hello)
                    "node_cpu_cores": round(cpu / wall, 3),
                    "node_cpu_us_per_datagram": round(cpu / max(1, handled) * 1e6, 1),
                    "queries": queries,
                    "queries_complete": complete,
                    "query_s_max": round(max(latencies), 4),
                    "certified_pings": queries,
                    "certified_pings_answered": answered,
                }
    finally:
        peer.close()
    return out


async def _wire_costs(manifest: Path, issuer: Any, n: int = 200) -> dict:
    """CPU of the wire's steps, one process, no sockets: ``n`` mutual handshakes (and the responder's
    share of them), sealing and opening a 500-byte RPC, and a store receipt signed and checked."""
    from qis_fhir.dht.certs import CertChecker
    from qis_fhir.dht.receipts import receipt_valid, sign_receipt
    from qis_fhir.dht.session import SecureChannel
    from qis_fhir.packets.manifest import load_manifest

    node_identity = issuer.identity()
    peers = [issuer.identity() for _ in range(3)]
    checker = CertChecker(load_manifest(manifest))  # after the identities: the issuer may add a site
    loop = asyncio.get_running_loop()
    channels: dict[tuple, SecureChannel] = {}

    def wire(address: tuple, identity: Any) -> SecureChannel:
        def send(data: bytes, to: tuple) -> None:
            loop.call_soon(channels[to].receive, data, address)

        channels[address] = SecureChannel(identity, checker, send, handshake_rate=1e9)
        return channels[address]

    node = wire(("node", 1), node_identity)
    spent = [0.0]
    for name in ("_init", "_fin"):
        step = getattr(node, name)

        def timed(*args: Any, step: Any = step) -> None:
            t = time.process_time()
            step(*args)
            spent[0] += time.process_time() - t

        setattr(node, name, timed)
    t = time.process_time()
    for i in range(n):
        assert await wire(("peer", i), peers[i % 3]).session_to(("node", 1)) is not None
    both = (time.process_time() - t) / n
    session = node.session_at(("peer", 0))
    payload = os.urandom(500)
    t = time.process_time()
    for _ in range(5000):
        channels[("peer", 0)].receive(node.seal(session, payload), ("node", 1))
    seal_open = (time.process_time() - t) / 5000
    wires = [os.urandom(500) for _ in range(15)]
    statuses = ["stored"] * 15
    t = time.process_time()
    for _ in range(200):
        assert receipt_valid(node_identity.cert, b"k" * 20, wires, statuses, sign_receipt(node_identity, b"k" * 20, wires, statuses))
    receipt = (time.process_time() - t) / 200
    return {
        "handshake_both_sides_us": round(both * 1e6),
        "handshake_responder_us": round(spent[0] / n * 1e6),
        "seal_and_open_500_bytes_us": round(seal_open * 1e6, 1),
        "receipt_sign_and_verify_15_packets_us": round(receipt * 1e6),
    }


def run(options: Any) -> dict:
    from qis_fhir.dht.cluster import LocalCluster
    from qis_fhir.packets.codec import PacketSigner, encode_packet
    from qis_fhir.packets.keys import create_site
    from qis_fhir.packets.manifest import add_site, create_network

    with tempfile.TemporaryDirectory(prefix="qis-bench-flood-") as tmp:
        root = Path(tmp)
        create_network(root / "net", network_id="flood-net")
        site = create_site("flood-site", root / "site")
        add_site(root / "net", root / "site")
        manifest = root / "net" / "manifest.json"
        fp = "ab" * 32
        wire = encode_packet(PacketSigner(site.private_key, site.site_id, site.key_id).sign(
            fingerprint=fp, treatment="TX_BENCH", measure="sbp", period="2024", patients=40, responders=21,
            mean_change=-6.5, sd_change=3.25, mapping_version="v1", seq=1))
        cluster = LocalCluster(root / "nodes", manifest, ksize=2)
        try:
            target, _ = cluster.start(2)
            cluster.wait_joined()
            by_kind = asyncio.run(_flood(target, cluster.issuer.identity(), manifest, fp, wire))
        finally:
            cluster.stop_all()
        costs = asyncio.run(_wire_costs(manifest, cluster.issuer))
    return {"rate_per_s": RATE, "seconds_per_kind": SECONDS, "by_kind": by_kind, "wire_cpu": costs}


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "send":
    _, _, kind, host, port, rate, seconds = sys.argv
    _send(kind, host, int(port), int(rate), float(seconds))
