"""Where clients and nodes bind: the client default reaches other machines, addresses parse one way.

A client bound to 127.0.0.1 can only talk to its own machine, and every other DHT test runs on
loopback, where that works; these tests look at the socket itself (and ``test_netns.py`` reaches a
node in another network namespace).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
from dht_cluster import LOOPBACK, REPO, base_sites, fingerprint, sign, start_nodes

from qis_fhir.dht.address import client_bind, format_address, parse_address
from qis_fhir.dht.client import DhtClient
from qis_fhir.errors import ExitCode, QisError

NOT_HERE = "198.51.100.7"  # TEST-NET-2 (RFC 5737): an address no interface of this machine has




def _sockname(client: DhtClient) -> tuple:
    return client.peer.transport.get_extra_info("sockname")


def test_client_binds_every_local_address_on_a_free_port_by_default(dht_network):
    fp = fingerprint(8000)
    wires = [sign(s, fp) for s in base_sites(dht_network)]

    async def run():
        (node,) = await start_nodes(dht_network, 1, host=LOOPBACK, ksize=2)
        try:
            async with DhtClient([(node.host, node.port)], dht_network.manifest, ksize=2) as client:
                host, port = _sockname(client)[:2]
                report = await client.publish(wires)
            async with DhtClient([(node.host, node.port)], dht_network.manifest, ksize=2, bind=f"{LOOPBACK}:0") as local:
                chosen = _sockname(local)[:2]
        finally:
            node.close()
        return host, port, report, chosen

    host, port, report, chosen = asyncio.run(run())
    assert host == "0.0.0.0" and port != 0  # 127.0.0.1 here could never send to another hospital
    assert report.confirmed == len(wires)
    assert chosen[0] == LOOPBACK and chosen[1] != 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_nodes_and_clients_work_over_ipv6(dht_network):
    fp = fingerprint(8001)
    wires = [sign(s, fp) for s in base_sites(dht_network)]

    async def run():
        nodes = await start_nodes(dht_network, 4, host="::1", ksize=3)
        try:
            async with DhtClient(f"[::1]:{nodes[1].port}", dht_network.manifest, ksize=3) as writer:
                bound = _sockname(writer)[0]
                report = await writer.publish(wires)
            async with DhtClient([("::1", nodes[3].port)], dht_network.manifest, ksize=3) as reader:
                result = await reader.query(fp)
            contacts = {n.ip for node in nodes for n in node.contacts()}
        finally:
            for node in nodes:
                node.close()
        return bound, report, result, contacts

    bound, report, result, contacts = asyncio.run(run())
    assert bound == "::"  # the default follows the peers' family
    assert report.confirmed == len(wires) and report.min_replicas == 3
    assert sorted(result.wires) == sorted(wires) and result.rejected == {}
    assert contacts == {"::1"}  # nodes routed to each other by IPv6 address (node triples, not n4 records)


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("10.1.2.3:8468", {}, ("10.1.2.3", 8468)),
        ("[::1]:8468", {}, ("::1", 8468)),
        ("[fd00::5]:0", {"allow_port_zero": True}, ("fd00::5", 0)),
        ("0.0.0.0", {"default_port": 0}, ("0.0.0.0", 0)),
        ("[::]", {"default_port": 0}, ("::", 0)),
        ("fd00::5", {"default_port": 0}, ("fd00::5", 0)),
        ("localhost:9", {}, ("127.0.0.1", 9)),
    ],
)
def test_addresses_parse_with_ipv6_in_brackets(text, options, expected):
    assert parse_address(text, **options) == expected
    assert parse_address(format_address(*expected), allow_port_zero=True) == expected


@pytest.mark.parametrize(
    ("text", "options", "why"),
    [
        ("::1:8468", {}, "[ADDRESS]:PORT"),  # itself a valid IPv6 address: never guessed
        ("[::1]", {}, "expected HOST:PORT"),
        ("[10.1.2.3]:5", {}, "brackets hold an IPv6 address"),
        ("[fd00::zz]:5", {}, "not an IPv6 address"),
        ("10.1.2.3:0", {}, "expected HOST:PORT"),
        (":8468", {"default_port": 0}, "expected HOST[:PORT]"),
        ("10.1.2.3:", {"default_port": 0}, "expected HOST[:PORT]"),
        ("10.1.2.3:65536", {}, "expected HOST:PORT"),
    ],
)
def test_malformed_addresses_are_usage_errors(text, options, why):
    with pytest.raises(QisError, match=why.replace("[", r"\[")) as exc:
        parse_address(text, **options)
    assert exc.value.exit_code == ExitCode.USAGE


def test_a_client_refuses_peers_of_another_address_family():
    with pytest.raises(QisError, match=r"cannot reach \[::1\]:9"):
        client_bind(None, [("10.1.2.3", 9), ("::1", 9)])
    with pytest.raises(QisError, match="cannot reach 10.1.2.3:9"):
        client_bind("[::]", [("10.1.2.3", 9)])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qis_fhir", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_bind_and_listen_addresses_this_machine_lacks_fail_clearly(dht_network, tmp_path):
    packets = tmp_path / "p.ndjson"
    packets.write_bytes(sign(dht_network.sites["site-a"], fingerprint(8002)) + b"\n")
    dht_network.issuer.certify(tmp_path / "n")  # a certified node, so binding is what fails
    runs = {
        "publish": _cli("publish", str(packets), "--bootstrap", f"{LOOPBACK}:9", "--bind", NOT_HERE, "--network", str(dht_network.manifest)),
        "query": _cli("query", fingerprint(8002), "--bootstrap", "[::1]:9", "--bind", LOOPBACK, "--network", str(dht_network.manifest)),
        "node": _cli("node", "--listen", f"{NOT_HERE}:0", "--data-dir", str(tmp_path / "n"), "--network", str(dht_network.manifest)),
    }
    for name, r in runs.items():
        assert r.returncode == ExitCode.USAGE and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
    assert f"cannot bind {NOT_HERE}:0" in runs["publish"].stderr
    assert "cannot reach [::1]:9" in runs["query"].stderr
    assert f"cannot bind {NOT_HERE}:0" in runs["node"].stderr
