"""Outsiders cost a node nothing: floods of junk, fresh node ids, stats and find_packets requests,
refused packets and replays, each sent from sockets on 127.0.0.1 to real node processes (or, where
the test needs the node's tables, to a node in this process), bounded in count and time.

Each test prints the figures docs/dht.md records (``pytest -s``)."""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import umsgpack
from dht_cluster import Cluster, base_sites, fingerprint, sign, tamper
from floods import MARKER, answer_like_a_node, cpu_seconds, flood, fresh_ping, junk_mix, request
from kademlia.node import Node

from qis_fhir.dht.client import DhtClient
from qis_fhir.dht.keys import RPC_CAP, dht_key
from qis_fhir.dht.limits import HEADER
from qis_fhir.dht.node import DhtNode, NodeConfig
from qis_fhir.dht.storage import PacketStore
from qis_fhir.dht.trust import ManifestVerifier

OPERATOR = "127.0.0.2"  # the nodes here answer stats from this address only; attackers use 127.0.0.1
N_KEYS = 2000  # keys every node of the loaded cluster holds (what a hand-off scan walks)
QUERIED = [fingerprint(70_000 + i) for i in range(10)]


@pytest.fixture(scope="module")
def loaded(dht_network, tmp_path_factory):
    """Three nodes holding N_KEYS keys each (one packet per key) plus one key of 40 packets."""
    c = Cluster(tmp_path_factory.mktemp("loaded"), dht_network.manifest, ksize=3, extra=["--operator", OPERATOR])
    try:
        c.start(3)
        c.wait_joined()
        a = dht_network.sites["site-a"]
        wires = [sign(a, fingerprint(70_000 + i)) for i in range(N_KEYS)]
        wires += [sign(s, fingerprint(79_999), treatment=f"TX_{t}") for s in base_sites(dht_network) for t in range(8)]
        report = _run(_publish(c, dht_network, wires))
        assert report.confirmed == len(wires) and report.min_replicas == 3
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def single(dht_network, tmp_path):
    c = Cluster(tmp_path / "one", dht_network.manifest, ksize=3, extra=["--operator", OPERATOR, "--maintenance-interval", "1"])
    try:
        c.start(1)
        c.wait_joined()
        yield c
    finally:
        c.stop_all()


def _run(coro):
    return asyncio.run(coro)


async def _publish(c, net, wires):
    async with DhtClient([c.nodes[0].address], net.manifest, ksize=3, bind="127.0.0.1") as client:
        return await client.publish(wires)


async def _stats(address, manifest) -> dict:
    async with DhtClient([address], manifest, ksize=3, bind=OPERATOR) as client:
        return await client.node_stats(address)


def _log_lines(node) -> list[str]:
    return (node.data_dir / "stdout.log").read_text(errors="replace").splitlines()


def test_forty_thousand_junk_datagrams_write_a_bounded_number_of_log_lines_and_nothing_they_carry(single):
    node = single.nodes[0]
    before = len(_log_lines(node))
    sent = flood(node.address, junk_mix, 40_000, rate=40_000, sources=64)
    deadline = time.monotonic() + 30  # the node writes its counts of dropped datagrams every 10 s
    while not any("dropped" in line for line in _log_lines(node)[before:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = _log_lines(node)[before:]
    print(f"\nlog flood: {sent['sent']} datagrams in {sent['seconds']:.2f} s -> {len(lines)} log lines")
    assert sent["sent"] == 40_000
    assert any("dropped" in line for line in lines)  # the counts are written ...
    assert len(lines) <= 20  # ... in a handful of lines (one per reason per second, counts every 10 s)
    assert not any(MARKER in line for line in _log_lines(node))  # nothing a peer sent reaches the log
    assert node.proc.poll() is None


def test_a_new_id_flood_leaves_queries_complete_and_fast_and_the_node_mostly_idle(loaded, dht_network):
    target = loaded.nodes[0]
    boot = [loaded.nodes[1].address]

    async def queries(stop: threading.Event | None, rounds: int) -> list[tuple[float, bool]]:
        out = []
        async with DhtClient(boot, dht_network.manifest, ksize=3, bind="127.0.0.1") as client:
            for i in range(rounds):
                if stop is not None and stop.is_set():
                    break
                fp = QUERIED[i % len(QUERIED)]
                started = time.perf_counter()
                result = await client.query(fp)
                out.append((time.perf_counter() - started, [p.fingerprint for p in result.packets] == [fp]))
        return out

    baseline = _run(queries(None, 20))
    last_id = [b""]

    def ping(i: int) -> bytes:
        data = fresh_ping(i)
        last_id[0] = data[-20:]
        return data

    done = threading.Event()
    result: dict = {}

    def attack() -> None:
        result.update(flood(target.address, ping, 3000, rate=300, on_reply=answer_like_a_node(lambda: last_id[0])))
        done.set()

    cpu0 = cpu_seconds(target.proc.pid)
    thread = threading.Thread(target=attack)
    thread.start()
    under = _run(queries(done, 10_000))
    thread.join(timeout=60)
    node_cpu = (cpu_seconds(target.proc.pid) - cpu0) / result["seconds"]
    base_ms, flood_ms = (1000 * statistics.median(t for t, _ in r) for r in (baseline, under))
    print(f"\nnew-id flood: {result['sent']} fresh ids at {result['rate']:.0f}/s; node CPU {node_cpu:.0%} of a core; "
          f"{len(under)} queries, recall {sum(ok for _, ok in under)}/{len(under)}, median {flood_ms:.1f} ms (baseline {base_ms:.1f} ms)")
    assert result["sent"] == 3000 and len(under) >= 10
    assert all(ok for _, ok in baseline + under)
    assert flood_ms <= 3 * base_ms + 50  # a regression bound: unbounded hand-off scans made it 40 s
    assert node_cpu < 0.5
    assert target.proc.poll() is None


def test_find_packets_and_stats_floods_get_no_amplification_and_operators_still_get_stats(loaded, dht_network):
    target = loaded.nodes[0]
    key = dht_key(fingerprint(79_999))
    small = flood(target.address, lambda i: request("find_packets", b"", key, None), 2000, rate=500, sources=8)
    padded = flood(target.address, lambda i: request("find_packets", b"", key, None, pad_to=RPC_CAP), 200, rate=200, sources=2)
    cpu0 = cpu_seconds(target.proc.pid)
    stats = flood(target.address, lambda i: request("stats", pad_to=4096), 2000, rate=500, sources=8)
    stats_cpu = (cpu_seconds(target.proc.pid) - cpu0) / stats["seconds"]
    for name, f in (("find_packets", small), ("find_packets padded", padded), ("stats", stats)):
        print(f"\n{name}: {f['sent']} requests, {f['sent_bytes']} bytes in, {f['received']} replies, "
              f"{f['received_bytes']} bytes out: {f['received_bytes'] / f['sent_bytes']:.3f}x")
    print(f"stats flood: node CPU {stats_cpu:.0%} of a core")
    assert small["received_bytes"] <= small["sent_bytes"]  # an unpadded request is too small for any reply
    assert padded["received"] > 0 and padded["received_bytes"] <= padded["sent_bytes"]
    assert stats["received"] == 0
    operator = _run(_stats(target.address, dht_network.manifest))
    assert operator["packets"] == N_KEYS + 40 and operator["dropped"]["stats_refused"] >= 2000

    async def read():  # an honest (padded) reader still gets every page
        async with DhtClient([target.address], dht_network.manifest, ksize=3, bind="127.0.0.1") as client:
            return await client.query(fingerprint(79_999))

    assert len(_run(read()).packets) == 40


def test_a_member_at_its_quota_and_60000_refused_packets_cost_no_disk(dht_network, tmp_path):
    """A member fills its quota (100 rows here), then sends 60,000 packets that are refused: valid
    but over quota, valid but under another key, and tampered."""
    a = dht_network.sites["site-a"]
    fp = fingerprint(90_000)
    key = dht_key(fp)
    quota = [sign(a, fp, treatment=f"TX_{i}") for i in range(100)]
    over = [sign(a, fp, treatment=f"TX_{i}") for i in range(100, 5100)]
    valid = [[w, 3600.0] for w in over]
    tampered = [[tamper(w), 3600.0] for w in over] * 10

    async def run():
        store = PacketStore(tmp_path / "n.sqlite3", max_rows_per_site=100)
        verifier = ManifestVerifier(dht_network.manifest, replay=store.replay_view())
        node = DhtNode(NodeConfig(host="127.0.0.1", ksize=3, maintenance_interval=3600), verifier, store)
        await node.start([])
        try:
            async with DhtClient([(node.host, node.port)], dht_network.manifest, ksize=3, bind="127.0.0.1") as client:
                peer = Node(node.node.id, node.host, node.port)
                assert await client.protocol.send_packets(peer, key, [[w, 3600.0] for w in quota]) == ["stored"] * 100
                store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                sizes0, disk0 = store.table_sizes(), _disk(tmp_path)
                refused = await client.protocol.send_packets(peer, key, valid)  # over quota
                refused += await client.protocol.send_packets(peer, dht_key(fingerprint(1)), valid)  # under another key
                refused += await client.protocol.send_packets(peer, key, tampered)
            await node.upkeep()  # the refusal counts reach SQLite here, in one write
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return sizes0, disk0, refused, store.table_sizes(), _disk(tmp_path), node.protocol.rejections
        finally:
            node.close()

    sizes0, disk0, refused, sizes1, disk1, rejections = _run(run())
    print(f"\nquota + 60,000 refused packets: tables {sizes0} -> {sizes1}; disk {disk0} -> {disk1} bytes")
    assert len(refused) == 60_000 and "stored" not in refused
    assert rejections["site_quota"] == 5000 and rejections["wrong_key"] == 5000 and rejections["bad_signature"] == 50_000
    assert sizes1["packets"] == sizes0["packets"] == 100 and sizes1["seen"] == sizes0["seen"] == 100
    assert disk1 - disk0 <= 16 * 4096  # the rejection counters: a few pages, not a row per packet


def _disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("n.sqlite3*"))


def test_a_20000_per_second_junk_flood_costs_little_cpu_and_answered_peers_are_still_served(single, dht_network):
    target = single.nodes[0]

    async def run():
        store = PacketStore(":memory:")
        honest = DhtNode(NodeConfig(host="127.0.0.1", ksize=3, maintenance_interval=3600, rpc_timeout=1.0),
                         ManifestVerifier(dht_network.manifest, replay=store.replay_view()), store)
        await honest.start([target.address])
        try:
            deadline = time.monotonic() + 10  # until the target has pinged it (its upkeep runs every second)
            while honest.protocol.gate.admitted == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert honest.protocol.gate.admitted > 0
            s0 = await _stats(target.address, dht_network.manifest)
            cpu0 = cpu_seconds(target.proc.pid)
            box: dict = {}
            worker = threading.Thread(target=lambda: box.update(
                flood(target.address, lambda i: fresh_ping(i) if i % 5 < 2 else junk_mix(i), 100_000, rate=20_000, sources=256)))
            worker.start()
            answered = asked = 0
            node = honest.contacts()[0]
            while worker.is_alive() and asked < 400:
                asked += 1
                ok, _ = await honest.protocol.call_find_packets(node, dht_key(QUERIED[0]))
                answered += bool(ok)
                await asyncio.sleep(0.02)
            await asyncio.get_running_loop().run_in_executor(None, worker.join, 60)
            cpu = cpu_seconds(target.proc.pid) - cpu0
            s1 = await _stats(target.address, dht_network.manifest)
            return box, cpu, s0, s1, answered, asked
        finally:
            honest.close()

    sent, cpu, s0, s1, answered, asked = _run(run())

    def seen(s):
        return s["admitted"] + s["replies"] + sum(s["dropped"].values())

    received = seen(s1) - seen(s0)
    per = cpu / received * 1e6
    print(f"\njunk flood: {sent['sent']} datagrams at {sent['rate']:.0f}/s, {received} reached the node, "
          f"node CPU {cpu / sent['seconds']:.0%} of a core, {per:.1f} us per datagram; honest find_packets answered {answered}/{asked}")
    assert sent["sent"] == 100_000 and received >= 0.9 * sent["sent"]
    assert per < 25.0  # half a core at 20,000 datagrams per second
    assert asked >= 20 and answered == asked
    assert target.proc.poll() is None


def test_replayed_requests_and_replies_are_dropped(dht_network):
    async def run():
        store = PacketStore(":memory:")
        node = DhtNode(NodeConfig(host="127.0.0.1", ksize=3, maintenance_interval=3600),
                       ManifestVerifier(dht_network.manifest, replay=store.replay_view()), store)
        await node.start([])
        loop = asyncio.get_running_loop()
        gate = node.protocol.gate
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
                ping = request("ping", b"", pad_to=32)
                for _ in range(3):  # one request datagram sent three times: answered once
                    s.sendto(ping, (node.host, node.port))
                answer = await asyncio.wait_for(loop.sock_recv(s, 65536), 5)
                assert answer[1:HEADER] == ping[1:HEADER]
                # the node asks s; s answers twice with the same reply: the second one is dropped
                call = asyncio.ensure_future(node.protocol._call("ping", s.getsockname(), node.node.id))
                asked = await asyncio.wait_for(loop.sock_recv(s, 65536), 5)
                reply = b"\x01" + asked[1:HEADER] + umsgpack.packb(bytes(20))
                s.sendto(reply, (node.host, node.port))
                ok, _ = await asyncio.wait_for(call, 5)
                s.sendto(reply, (node.host, node.port))
                deadline = time.monotonic() + 5
                while (gate.dropped["replayed_request"] < 2 or gate.dropped["unexpected_reply"] < 1) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                return dict(gate.dropped), gate.admitted, gate.replies, ok
        finally:
            node.close()

    dropped, admitted, replies, ok = _run(run())
    assert ok and admitted == 1 and replies == 1
    assert dropped["replayed_request"] == 2 and dropped["unexpected_reply"] == 1
