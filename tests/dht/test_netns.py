"""Two hosts on one machine: a real node process in its own network namespace, reached over a veth pair.

Every other DHT test runs on loopback, where a client bound to 127.0.0.1 works; that is how a client
that could never leave its machine went unnoticed. Here the node sits behind a veth pair in its own
namespace on addresses from 198.18.0.0/15 (RFC 2544 benchmarking, never routed anywhere else), and
the host namespace publishes and queries through the default client bind. Needs root and iproute2:
skipped without them, failed without them under CI (``.ci/run`` installs iproute2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dht_cluster import LOOPBACK, REPO, fingerprint, sign

from qis_fhir.dht.client import DhtClient, publish
from qis_fhir.dht.cluster import START_TIMEOUT, stop_processes, wait_for_json
from qis_fhir.errors import NoPeersError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")
SITES = ("site-a", "site-b", "site-c")


@dataclass
class Netns:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    node_ip: str

    def run(self, *cmd: str) -> str:
        """A command inside the namespace (its stdout)."""
        return _ip("netns", "exec", self.name, *cmd)


@dataclass
class NsNode:
    proc: subprocess.Popen
    port: int
    log: Path


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20).stdout


def _free_block(tag: int) -> tuple[str, str]:
    """A /30 of the benchmarking range that no interface here uses yet: (host side, namespace side)."""
    used = _ip("-o", "-4", "addr", "show")
    blocks = BENCHMARK_NET.num_addresses // 4
    for i in range(blocks):
        net = ipaddress.ip_network(f"{BENCHMARK_NET.network_address + 4 * ((tag + i) % blocks)}/30")
        host, node = (str(a) for a in net.hosts())
        if f" {host}/" not in used and f" {node}/" not in used:
            return host, node
    raise AssertionError("every /30 of 198.18.0.0/15 is in use here")


@pytest.fixture
def netns(require):
    require(shutil.which("ip") is not None, "needs iproute2 (`ip`) to create a network namespace")
    require(os.geteuid() == 0, "needs root to create a network namespace")
    tag = os.getpid() % 100_000
    host_ip, node_ip = _free_block(tag)
    ns = Netns(f"qis-bind-{tag}", f"qb{tag}h", f"qb{tag}n", host_ip, node_ip)
    try:
        try:
            _ip("netns", "add", ns.name)
            _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
            _ip("link", "set", ns.ns_if, "netns", ns.name)
            _ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
            _ip("link", "set", ns.host_if, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.node_ip}/30", "dev", ns.ns_if)
            _ip("-n", ns.name, "link", "set", ns.ns_if, "up")
        except subprocess.CalledProcessError as exc:
            require(False, f"cannot create a network namespace with a veth pair here: {exc.stderr.strip()}")
        yield ns
    finally:
        # deleting the namespace removes both veth ends; the link delete covers a set-up that stopped
        # before the peer moved into it
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, timeout=20)


@pytest.fixture
def ns_node(netns, dht_network, tmp_path):
    """``qis-fhir node --listen NODE_IP:0`` inside the namespace, stopped by pid at the end."""
    data = tmp_path / "ns-node"
    dht_network.issuer.certify(data)  # makes the directory
    log = data / "stdout.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "qis_fhir", "node", "--listen", f"{netns.node_ip}:0",
             "--data-dir", str(data), "--network", str(dht_network.manifest), "--ksize", "2"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        # `ip netns exec` execs the command in place, so the node's pid is the one we hold
        state = wait_for_json(data / "node.json", proc, time.monotonic() + START_TIMEOUT, "node in namespace",
                              ready=lambda d: d.get("pid") == proc.pid and bool(d.get("port")), log=log)
        yield NsNode(proc, int(state["port"]), log)
    finally:
        stop_processes([proc])


def test_a_node_in_another_namespace_is_reached_through_the_default_client_bind(netns, ns_node, dht_network, tmp_path):
    node = (netns.node_ip, ns_node.port)
    # the node bound exactly --listen: the namespace holds one UDP socket, on the node's address
    sockets = {line.split()[3] for line in netns.run("ss", "-H", "-u", "-a", "-n").splitlines()}
    assert sockets == {f"{netns.node_ip}:{ns_node.port}"}

    fp = fingerprint(7000)
    wires = [sign(dht_network.sites[s], fp) for s in SITES]
    packets = tmp_path / "packets.ndjson"
    packets.write_bytes(b"".join(w + b"\n" for w in wires))
    r = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "publish", str(packets), "--bootstrap", f"{netns.node_ip}:{ns_node.port}",
         "--network", str(dht_network.manifest), "--ksize", "2", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert r.returncode == 0, r.stderr + ns_node.log.read_text()[-2000:]
    assert '"confirmed": 3' in r.stdout and '"min_replicas": 1' in r.stdout

    async def read_back():
        async with DhtClient([node], dht_network.manifest, ksize=2) as client:
            return client.peer.transport.get_extra_info("sockname")[0], await client.query(fp)

    bound, result = asyncio.run(read_back())
    assert bound == "0.0.0.0"
    assert sorted(result.wires) == sorted(wires) and result.rejected == {}
    assert sorted(p.site_id for p in result.packets) == list(SITES)

    # what every client did before --bind: a socket on 127.0.0.1 cannot send to another host
    with pytest.raises(NoPeersError):
        publish(wires, [node], dht_network.manifest, ksize=2, bind=LOOPBACK, rpc_timeout=0.5)
