"""``qis-fhir bench --only dht``: the package's stock ``get`` beside our ``query`` on one network.

For each network size N (default 10, 30, 100) this starts N real DHT nodes (our ``DhtNode``: SQLite
storage, verifying protocol) on 127.0.0.1, several nodes per worker process, each node in its
process's asyncio loop on its own port (100 single-node processes would swamp 2 cores). Then, with a
network made for the run (governance key, five sites, real signed packets):

* stock: every site's packet for each fingerprint is stored with the package's own ``Server.set``
  (the stock ``store`` RPC, which our nodes verify), and read back with the package's own
  ``Server.get`` algorithm (``ValueSpiderCrawl``; a subclass only counts its rounds). A stock value
  is one value per key, so ``get`` can return one site's packet: that is its recall.
* ours: the same packets through ``publish`` and the same fingerprints through ``query``.

Every node is certified by an operator site of the bench's network (``qis_fhir.dht.cluster.issue_certs``)
and speaks the authenticated wire; stock's algorithms run over the same wire, so the time ratio to
stock leaves out what authentication costs (``docs/dht.md`` compares releases for that).

Both read through one fresh client, interleaved per fingerprint, so machine noise hits both alike.
Reported: recall, median seconds per query and their ratio (ours / stock), lookup hops (sequential
RPC rounds) against log2(N).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qis_fhir.dht.cluster import LOOPBACK, issue_certs, stop_processes, wait_for_json
from qis_fhir.files import atomic_write

DEFAULT_SIZES = (10, 30, 100)
SITES = 5
FINGERPRINTS = 20
ROUNDS = 5
KSIZE = 8
BURST_FINGERPRINTS = 200  # x SITES packets per burst
NODES_PER_WORKER = 25
STOP_GRACE = 15.0  # a worker stops 25 nodes
START_SECONDS = 120.0
START_SECONDS_PER_NODE = 1.0


# ---------------------------------------------------------------------- worker (a process of nodes)
async def _worker(count: int, seed: str, manifest: str, root: str, ksize: int, out: str) -> None:
    from qis_fhir.dht.address import parse_addresses
    from qis_fhir.dht.node import NodeConfig
    from qis_fhir.dht.service import open_node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    boot = parse_addresses(seed)
    nodes = []
    for i in range(count):
        node = open_node(NodeConfig(host=LOOPBACK, ksize=ksize, maintenance_interval=3600), _node_dir(Path(root), i), Path(manifest))
        peers = boot + ([(nodes[-1].host, nodes[-1].port)] if nodes else [])
        await node.start(peers)
        nodes.append(node)
        if not boot:
            boot = [(node.host, node.port)]
    atomic_write(Path(out), json.dumps([[n.host, n.port] for n in nodes]).encode())
    await stop.wait()
    for node in nodes:
        node.close()


def _node_dir(root: Path, i: int) -> Path:
    return root / f"node{i:03d}"


def _spawn_worker(count: int, seed: str, manifest: Path, root: Path, ksize: int, out: Path) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qis_fhir.bench.dht", "worker", str(count), seed, str(manifest), str(root), str(ksize), str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(path: Path, proc: subprocess.Popen, deadline: float) -> list[tuple[str, int]]:
    return [(h, int(p)) for h, p in wait_for_json(path, proc, deadline, "bench worker")]


def start_network(n: int, manifest: Path, root: Path, ksize: int) -> tuple[list[subprocess.Popen], list[tuple[str, int]]]:
    """N nodes in worker processes of up to NODES_PER_WORKER each, after a seed worker of at most 5
    (the first worker's first node seeds the rest)."""
    procs: list[subprocess.Popen] = []
    addresses: list[tuple[str, int]] = []
    # a join looks up a random id in every further subtree it knows few nodes of (DhtNode.join): about
    # 120 RPCs a node at N = 1,000, all workers at once on 2 cores, so the wait grows with N
    deadline = time.monotonic() + START_SECONDS + START_SECONDS_PER_NODE * n
    try:
        sizes = [NODES_PER_WORKER] * (n // NODES_PER_WORKER) + ([n % NODES_PER_WORKER] if n % NODES_PER_WORKER else [])
        first = min(sizes[0], 5)  # a small seed worker first, so the others have someone to join
        sizes = [first] + ([sizes[0] - first] if sizes[0] > first else []) + sizes[1:]
        # every node certified before any starts: the manifest (operator sites) is final by then
        issue_certs(manifest, root / "operators", [_node_dir(root / f"w{w}", i) for w, size in enumerate(sizes) for i in range(size)])
        out = root / "w0.json"
        procs.append(_spawn_worker(sizes[0], "", manifest, root / "w0", ksize, out))
        addresses += _wait_for(out, procs[0], deadline)
        seed = f"{addresses[0][0]}:{addresses[0][1]}"
        outs = []
        for i, size in enumerate(sizes[1:], start=1):
            outs.append(root / f"w{i}.json")
            procs.append(_spawn_worker(size, seed, manifest, root / f"w{i}", ksize, outs[-1]))
        for out, proc in zip(outs, procs[1:]):
            addresses += _wait_for(out, proc, deadline)
        return procs, addresses
    except BaseException:
        stop_processes(procs, STOP_GRACE)
        raise


# ---------------------------------------------------------------------- measurement
def _packets(root: Path) -> tuple[Path, dict[str, list[bytes]], list[list[bytes]]]:
    """A network of SITES sites; packets for FINGERPRINTS shared fingerprints, and two disjoint burst sets."""
    import hashlib

    from qis_fhir.packets.codec import PacketSigner, encode_packet
    from qis_fhir.packets.keys import create_site
    from qis_fhir.packets.manifest import MAX_MAX_NODES_PER_SITE, add_site, create_network

    net = root / "net"
    create_network(net, network_id="bench-net", max_nodes_per_site=MAX_MAX_NODES_PER_SITE)  # few operator sites
    by_fp: dict[str, list[bytes]] = {}
    bursts: list[list[bytes]] = [[], []]
    fps = [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(FINGERPRINTS)]
    burst_fps = [[hashlib.sha256(f"burst-{b}-{i}".encode()).hexdigest() for i in range(BURST_FINGERPRINTS)] for b in range(2)]
    for s in range(SITES):
        site = create_site(f"bench-site-{s}", root / "sites" / str(s))
        add_site(net, root / "sites" / str(s))
        signer = PacketSigner(site.private_key, site.site_id, site.key_id)

        def one(fp: str) -> bytes:
            return encode_packet(signer.sign(fingerprint=fp, treatment="TX_BENCH", measure="sbp", period="2024", patients=40,
                                             responders=21, mean_change=-6.5, sd_change=3.25, mapping_version="v1", seq=1))

        for fp in fps:
            by_fp.setdefault(fp, []).append(one(fp))
        for b in range(2):
            bursts[b].extend(one(fp) for fp in burst_fps[b])
    return net / "manifest.json", by_fp, bursts


async def _burst(addresses: list[tuple[str, int]], manifest: Path, bursts: list[list[bytes]], ksize: int) -> dict:
    """The same publish code unbounded (every key and RPC at once, no retry, 5 s timeouts: how the
    package's ``set`` behaves under ``gather``) beside our bounded default, on disjoint packet sets."""
    from qis_fhir.dht.client import DhtClient

    out = {}
    boot = [addresses[0]]
    unbounded = dict(max_inflight=1_000_000, key_concurrency=1_000_000, retries=0, rpc_timeout=5.0)
    for name, packets, opts in (("unbounded", bursts[0], unbounded), ("bounded", bursts[1], {})):
        async with DhtClient(boot, manifest, ksize=ksize, bind=LOOPBACK, **opts) as client:
            report = (await client.publish(packets)).to_dict()
        out[name] = {
            "packets": report["packets"],
            "confirmed": report["confirmed"],
            "min_replicas": report["min_replicas"],
            "rpcs": report["rpcs"],
            "rpc_timeouts": report["rpc_timeouts"],
            "elapsed_s": report["elapsed_s"],
            "packets_per_s": round(report["packets"] / report["elapsed_s"], 1) if report["elapsed_s"] else None,
        }
    return out


async def _measure(addresses: list[tuple[str, int]], manifest: Path, by_fp: dict[str, list[bytes]], ksize: int) -> dict:
    from kademlia.crawling import ValueSpiderCrawl
    from kademlia.network import Server
    from kademlia.node import Node
    from kademlia.utils import digest

    from qis_fhir.dht.client import DhtClient

    class CountingValueSpider(ValueSpiderCrawl):
        """The stock crawl, counting its rounds (one ``_find`` call per sequential round)."""

        rounds = 0

        async def _find(self, rpcmethod: Any) -> Any:
            self.rounds += 1
            return await super()._find(rpcmethod)

    async def stock_get(peer: Any, fp: str) -> tuple[Any, int]:
        """``Server.get`` line for line, with the counting crawl."""
        dkey = digest(fp)
        if peer.storage.get(dkey) is not None:
            return peer.storage.get(dkey), 0
        node = Node(dkey)
        nearest = peer.protocol.router.find_neighbors(node)
        spider = CountingValueSpider(peer.protocol, node, nearest, peer.ksize, peer.alpha)
        value = await spider.find()
        return value, spider.rounds

    boot = [addresses[0], addresses[len(addresses) // 2]]
    fps = sorted(by_fp)
    # stock set: each site's packet under the same key, one set() each (what the package offers)
    async with DhtClient(boot, manifest, ksize=ksize, bind=LOOPBACK) as setter:
        t = time.perf_counter()
        set_ok = 0
        for fp in fps:
            for wire in by_fp[fp]:
                set_ok += bool(await Server.set(setter.peer, fp, wire))
        stock_set_s = time.perf_counter() - t
    async with DhtClient(boot[::-1], manifest, ksize=ksize, bind=LOOPBACK) as publisher:
        report = await publisher.publish([w for fp in fps for w in by_fp[fp]])
    modes = {"exhaustive": None, "quorum3": 3}
    async with DhtClient(boot, manifest, ksize=ksize, bind=LOOPBACK) as reader:
        sent0, failed0 = reader.protocol.rpc_sent, reader.protocol.rpc_failed
        stock_t, stock_hops, stock_recall = [], [], []
        ours: dict[str, dict[str, Any]] = {m: {"t": [], "hops": [], "rpcs": [], "recall": [], "missed_keys": 0} for m in modes}
        for r in range(ROUNDS):
            for fp in fps:  # interleaved: stock, then each of our modes, on the same fingerprint
                t = time.perf_counter()
                value, rounds = await stock_get(reader.peer, fp)
                stock_t.append(time.perf_counter() - t)
                if r == 0:
                    expected = set(by_fp[fp])
                    stock_recall.append(len({value} & expected) / len(expected) if isinstance(value, bytes) else 0.0)
                    stock_hops.append(rounds)
                for mode, quorum in modes.items():
                    reader.quorum = quorum
                    t = time.perf_counter()
                    result = await reader.query(fp)
                    m = ours[mode]
                    m["t"].append(time.perf_counter() - t)
                    if r == 0:
                        m["recall"].append(len(set(result.wires) & set(by_fp[fp])) / len(by_fp[fp]))
                        m["missed_keys"] += not result.wires
                        m["hops"].append(result.hops)
                        m["rpcs"].append(result.nodes_asked + result.pages)
        # RPCs of the reader that got no reply in time (stock and ours): load shows here, a lookup
        # that converges on the wrong nodes does not
        reader_rpcs, reader_timeouts = reader.protocol.rpc_sent - sent0, reader.protocol.rpc_failed - failed0
    med_s = statistics.median(stock_t)
    per_mode = {}
    for mode, m in ours.items():
        med_o = statistics.median(m["t"])
        per_mode[mode] = {
            "recall": round(statistics.mean(m["recall"]), 4),
            "query_s_median": round(med_o, 5),
            "time_ratio_vs_stock": round(med_o / med_s, 3) if med_s else None,
            "time_ratio_paired_median": round(statistics.median(o / s for o, s in zip(m["t"], stock_t) if s > 0), 3),
            "hops_mean": round(statistics.mean(m["hops"]), 2),
            "hops_max": max(m["hops"]),
            "rpcs_mean": round(statistics.mean(m["rpcs"]), 2),
            "keys_found_nothing": m["missed_keys"],
        }
    return {
        "fingerprints": len(fps),
        "sites": SITES,
        "ksize": ksize,
        "stock_set_s_per_packet": round(stock_set_s / max(1, sum(len(v) for v in by_fp.values())), 5),
        "stock_set_true": set_ok,
        "ours_publish": report.to_dict(),
        "recall_stock": round(statistics.mean(stock_recall), 4),
        "query_s_median_stock": round(med_s, 5),
        "hops_stock_mean": round(statistics.mean(stock_hops), 2),
        "hops_stock_max": max(stock_hops),
        "ours": per_mode,
        "reader_rpcs": reader_rpcs,
        "reader_rpc_timeouts": reader_timeouts,
        "log2_n": round(math.log2(len(addresses)), 2),
    }


def run(options: Any) -> dict:
    sizes = tuple(getattr(options, "nodes", None) or DEFAULT_SIZES)
    ksize = int(getattr(options, "ksize", None) or KSIZE)
    out: dict = {
        "method": f"N nodes on 127.0.0.1, up to {NODES_PER_WORKER} per worker process (one asyncio loop each, one port per node); "
        "stock = kademlia's Server.set/Server.get algorithm on the same nodes and fingerprints",
        "by_nodes": {},
    }
    with tempfile.TemporaryDirectory(prefix="qis-bench-dht-") as tmp:
        root = Path(tmp)
        manifest, by_fp, bursts = _packets(root)
        for n in sizes:
            procs, addresses = start_network(n, manifest, root / f"n{n}", ksize)
            try:
                time.sleep(0.5)
                out["by_nodes"][str(n)] = {"nodes": len(addresses), **asyncio.run(_measure(addresses, manifest, by_fp, ksize))}
                if n == max(sizes):
                    out["burst"] = {"nodes": n, **asyncio.run(_burst(addresses, manifest, bursts, ksize))}
            finally:
                stop_processes(procs, STOP_GRACE)
    return out


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "worker":
    _, _, count, seed, manifest, root, ksize, out = sys.argv
    asyncio.run(_worker(int(count), seed, manifest, root, int(ksize), out))
