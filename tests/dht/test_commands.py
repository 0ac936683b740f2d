"""The ``node``, ``publish`` and ``query`` commands as a user runs them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from dht_cluster import LOOPBACK, REPO, Cluster, fingerprint, sign

from qis_fhir.errors import ExitCode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qis_fhir", *args], capture_output=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def trio(dht_network, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("trio"), dht_network.manifest, ksize=3)
    try:
        c.start(3)
        c.wait_joined()
        yield c
    finally:
        c.stop_all()


def test_node_binds_only_the_given_interface_and_stops_cleanly_on_sigterm_and_sigint(trio):
    for node in trio.nodes[1:]:
        udp = [c for c in psutil.Process(node.proc.pid).net_connections(kind="udp")]
        assert udp and all(c.laddr.ip == "127.0.0.1" for c in udp)
        assert {c.laddr.port for c in udp} == {node.port}
    trio.nodes[1].proc.send_signal(signal.SIGTERM)
    trio.nodes[2].proc.send_signal(signal.SIGINT)
    for node in trio.nodes[1:]:
        assert node.proc.wait(timeout=15) == 0
        log = (node.data_dir / "stdout.log").read_text()
        assert f"listening on 127.0.0.1:{node.port}" in log and log.rstrip().endswith("stopped")
    trio.restart(trio.nodes[1], [trio.nodes[0].address])
    trio.restart(trio.nodes[2], [trio.nodes[0].address])


def test_publish_and_query_commands(trio, dht_network, tmp_path):
    fp = fingerprint(5000)
    wires = [sign(dht_network.sites[s], fp) for s in ("site-a", "site-b", "site-c")]
    packets = tmp_path / "packets.ndjson"
    packets.write_bytes(b"".join(w + b"\n" for w in wires))
    boot = f"127.0.0.1:{trio.nodes[1].port}"
    r = _cli("publish", str(packets), "--bootstrap", boot, "--bind", LOOPBACK, "--network", str(dht_network.manifest), "--ksize", "3", "--json")
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["confirmed"] == 3 and summary["min_replicas"] == 3

    r = _cli("query", fp, "--bootstrap", f"127.0.0.1:{trio.nodes[2].port}", "--bind", LOOPBACK, "--network", str(dht_network.manifest), "--ksize", "3")
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(r.stdout.splitlines()) == sorted(wires)
    assert "3 packets from 3 sites" in r.stderr.decode()

    # a file with one packet that fails verification: the others are still published, the exit says so
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(wires[0] + b"\n" + wires[1].replace(b'"n":20', b'"n":99') + b"\n")
    r = _cli("publish", str(bad), "--bootstrap", boot, "--bind", LOOPBACK, "--network", str(dht_network.manifest), "--ksize", "3")
    assert r.returncode == ExitCode.PACKETS_REJECTED
    assert b"1 of 2 packets failed verification here and were not published (bad_signature 1)" in r.stderr


def test_publish_fails_clearly_when_no_peer_answers(dht_network, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nobody answers on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        packets = tmp_path / "p.ndjson"
        packets.write_bytes(sign(dht_network.sites["site-a"], fingerprint(5001)) + b"\n")
        started = time.monotonic()
        r = _cli("publish", str(packets), "--bootstrap", f"127.0.0.1:{port}", "--bind", LOOPBACK, "--network", str(dht_network.manifest))
    assert r.returncode == ExitCode.NO_PEERS
    assert f"no DHT peer answered at 127.0.0.1:{port}" in r.stderr.decode()
    assert time.monotonic() - started < 30


def test_garbage_datagrams_are_counted_and_the_node_keeps_serving(trio, dht_network):
    """Junk of every datagram type (and none) is dropped at the wire, counted, and costs no reply."""
    import asyncio
    import os
    from collections import Counter

    from qis_fhir.dht.client import DhtClient

    node = trio.nodes[0]
    junk = [b"\x00" * 30, b"\x00" + os.urandom(20) + b"\xc1\xc1", b"\x00" + os.urandom(20) + os.urandom(2000),
            b"\x56" + os.urandom(40), b"\x51" + os.urandom(10), b"\x53" + os.urandom(319), b"\x55" + os.urandom(60), b""]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.settimeout(0.3)
        for datagram in junk:
            s.sendto(datagram, node.address)
        with pytest.raises(TimeoutError):  # not one of them is answered
            s.recvfrom(65536)

    async def check():
        async with DhtClient([node.address], dht_network.manifest, ksize=3, bind=LOOPBACK) as client:
            deadline = time.monotonic() + 10
            while True:  # stats are cached for a second: poll until the junk is counted
                stats = await client.node_stats(node.address)
                if sum(stats["dropped"].values()) >= len(junk) or time.monotonic() > deadline:
                    return Counter(stats["dropped"])
                await asyncio.sleep(0.2)

    dropped = asyncio.run(check())
    assert node.proc.poll() is None
    # the gate drops the two of impossible size unread; the wire drops the rest after a dict lookup or one HMAC
    assert dropped["datagram_size"] == 2 and dropped["not_protocol"] >= 3
    assert dropped["unknown_session"] >= 1 and dropped["bad_cookie"] >= 1


def test_publish_exits_12_when_every_replica_refuses(dht_network, tmp_path):
    """The nodes are members but do not know the publishing site yet (their manifest is older)."""
    from dht_cluster import fork_network, make_network

    theirs = make_network(tmp_path / "theirs", ["site-y"])
    c = Cluster(tmp_path / "c", theirs.manifest, ksize=2)
    try:
        c.start(2)
        c.wait_joined()
        ours = fork_network(theirs, tmp_path / "ours")
        site = ours.add("site-late", tmp_path / "sites")
        packets = tmp_path / "p.ndjson"
        packets.write_bytes(sign(site, fingerprint(5002)) + b"\n")
        r = _cli("publish", str(packets), "--bootstrap", f"127.0.0.1:{c.nodes[0].port}", "--bind", LOOPBACK,
                 "--network", str(ours.manifest), "--ksize", "2", "--json")
        assert r.returncode == ExitCode.PUBLISH_INCOMPLETE, r.stderr.decode()
        summary = json.loads(r.stdout)
        assert summary["confirmed"] == 0 and summary["refused_by_nodes"] == {"unknown_key": 2}
        assert "1 of 1 packets were confirmed by no replica" in r.stderr.decode()
    finally:
        c.stop_all()


def test_nodes_of_another_network_are_no_peers(dht_network, tmp_path):
    """A node certified in another network is not a peer at all: the client refuses its certificate."""
    from dht_cluster import make_network

    stranger = make_network(tmp_path / "other", ["site-z"])
    c = Cluster(tmp_path / "c", stranger.manifest, ksize=2)
    try:
        c.start(1)
        packets = tmp_path / "p.ndjson"
        packets.write_bytes(sign(dht_network.sites["site-a"], fingerprint(5003)) + b"\n")
        r = _cli("publish", str(packets), "--bootstrap", f"127.0.0.1:{c.nodes[0].port}", "--bind", LOOPBACK,
                 "--network", str(dht_network.manifest), "--ksize", "2", "--json")
        assert r.returncode == ExitCode.NO_PEERS, r.stderr.decode()
    finally:
        c.stop_all()
