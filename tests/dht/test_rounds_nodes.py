"""Round messages over real node processes on 127.0.0.1 (``python -m qis_fhir node``), 6 nodes, k = 3.

The nodes run on the real clock, so each test picks the round's opening date that puts "now" where it
needs it: today (every contribution window open, the reveal not yet), or a month ago (every window
closed). The reader's board gets an injected clock after the windows, since reading waits for them.
Every process is stopped by PID in the fixture's finalizer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pytest
from dht_cluster import BASE_SITES, LOOPBACK, joined_cluster, make_network

from qis_fhir.dht.board import DhtBoard
from qis_fhir.dht.client import DhtClient
from qis_fhir.dht.rounds import RoundKeys, decode_chunk, location, round_key, seal
from qis_fhir.errors import ExitCode, RoundRepeatedError, RoundWindowError
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import load_network
from qis_fhir.secagg.round import SCHEDULE, RoundRef

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KSIZE = 3
N_NODES = 6
TODAY = datetime.now(UTC).date().isoformat()
MONTH_AGO = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = make_network(tmp_path_factory.mktemp("rounds-nodes-net"), BASE_SITES)
    network.context = load_network(network.manifest)
    return network


@pytest.fixture(scope="module")
def cluster(net, tmp_path_factory):
    with joined_cluster(tmp_path_factory.mktemp("rounds-cluster"), net.manifest, N_NODES, KSIZE) as c:
        net.context = load_network(net.manifest)  # now with the operator site that certified the nodes
        yield c


def _ref(net, measure: str, opens: str = TODAY) -> RoundRef:
    return RoundRef(net.context.manifest.network_id, "v1", measure, "2025", "presence", opens)


def _client(cluster, net) -> DhtClient:
    return DhtClient([cluster.nodes[0].address], net.context.manifest, ksize=KSIZE, bind=LOOPBACK)


async def _store_raw(client, net, ref, site_id: str, phase: str, message: bytes, sign=None) -> list[str]:
    """Seal and store chunks without the board's own checks: what a node says to each, flattened."""
    site = net.sites[site_id]
    keys = RoundKeys.derive(ref, net.context.secret)
    wires = seal(message, ref=ref, keys=keys, phase=phase, key_id=site.key_id, sign=sign or site.private_key.sign)
    results, _ = await client.store_items(round_key(keys.tag, site.key_id), [[w, 3600.0] for w in wires])
    return [s for statuses in results for s in statuses]


async def _rejections(client, cluster) -> dict[str, int]:
    total: dict[str, int] = {}
    for node in cluster.live():
        stats = await client.node_stats(node.address)
        for reason, n in (stats or {}).get("rejections", {}).items():
            total[reason] = total.get(reason, 0) + n
    return total


def test_five_sites_round_trip_every_contribution_phase(cluster, net):
    ref = _ref(net, "sbp")
    after = SCHEDULE.closes(ref.opens, "consistency") + 1
    sizes = {"advertise": 200, "shares": 1_500, "masked": 40_000, "consistency": 300}
    sent = {phase: {s: os.urandom(size + i) for i, s in enumerate(BASE_SITES)} for phase, size in sizes.items()}

    async def run():
        async with _client(cluster, net) as client:
            for phase in sizes:
                for site_id in BASE_SITES:
                    board = DhtBoard(client, net.context, ref, net.sites[site_id])
                    await board.post(phase, site_id, sent[phase][site_id])
                    assert board.posted[phase]["min_replicas"] >= 1
        async with DhtClient([cluster.nodes[-1].address], net.context.manifest, ksize=KSIZE, bind=LOOPBACK) as client:
            reader = DhtBoard(client, net.context, ref, clock=lambda: after)
            return {phase: await reader.collect(phase) for phase in sizes}, reader.reads

    got, reads = asyncio.run(run())
    assert got == sent
    assert all(not (r.equivocated or r.incomplete or r.invalid) for r in reads.values())


def test_a_late_contribution_is_refused_at_the_node(cluster, net):
    ref = _ref(net, "late", opens=MONTH_AGO)

    async def run():
        async with _client(cluster, net) as client:
            before = (await _rejections(client, cluster)).get("late", 0)
            statuses = await _store_raw(client, net, ref, "site-a", "masked", os.urandom(1000))
            board = DhtBoard(client, net.context, ref, net.sites["site-a"])
            with pytest.raises(RoundWindowError, match="masked window .* closed"):
                await board.post("masked", "site-a", b"late")
            return statuses, (await _rejections(client, cluster)).get("late", 0) - before

    statuses, counted = asyncio.run(run())
    assert statuses and set(statuses) == {"late"}
    assert counted == len(statuses)


def test_a_reveal_before_its_window_is_refused_at_the_node(cluster, net):
    ref = _ref(net, "early")

    async def run():
        async with _client(cluster, net) as client:
            reveal = await _store_raw(client, net, ref, "site-b", "reveal", b"seed shares")
            masked = await _store_raw(client, net, ref, "site-b", "masked", b"masked vector")
            return reveal, masked

    reveal, masked = asyncio.run(run())
    assert reveal and set(reveal) == {"early"}
    assert masked and set(masked) == {"stored"}  # the same round takes contributions now


def test_forged_unsigned_and_non_member_chunks_are_refused_at_the_node(cluster, net, tmp_path):
    ref = _ref(net, "forged")
    outsider = create_site("outsider", tmp_path / "outsider")  # a real key, never added to the manifest

    async def run():
        async with _client(cluster, net) as client:
            unsigned = await _store_raw(client, net, ref, "site-c", "masked", b"x", sign=lambda m: bytes(64))
            impostor = await _store_raw(client, net, ref, "site-c", "masked", b"x", sign=net.sites["site-d"].private_key.sign)
            keys = RoundKeys.derive(ref, net.context.secret)
            wire = seal(b"x", ref=ref, keys=keys, phase="masked", key_id=outsider.key_id, sign=outsider.private_key.sign)
            results, _ = await client.store_items(round_key(keys.tag, outsider.key_id), [[w, 3600.0] for w in wire])
            held = await client.node_holdings(cluster.nodes[0].address, location(keys.tag, net.sites["site-c"].key_id))
            return unsigned, impostor, [s for r in results for s in r], held

    unsigned, impostor, outsider_statuses, held = asyncio.run(run())
    assert unsigned and set(unsigned) == {"bad_signature"}
    assert impostor and set(impostor) == {"bad_signature"}  # another member's key signing as site-c
    assert outsider_statuses and set(outsider_statuses) == {"unknown_key"}
    assert held == []


def test_a_second_message_is_refused_at_the_node_and_by_the_board(cluster, net):
    ref = _ref(net, "rerun")

    async def run():
        async with _client(cluster, net) as client:
            board = DhtBoard(client, net.context, ref, net.sites["site-e"])
            await board.post("masked", "site-e", b"first masked vector")
            await board.post("masked", "site-e", b"first masked vector")  # a re-run posting the same: fine
            with pytest.raises(RoundRepeatedError, match="already posted a different masked message"):
                await board.post("masked", "site-e", b"changed masked vector")
            return await _store_raw(client, net, ref, "site-e", "masked", b"changed masked vector")

    statuses = asyncio.run(run())
    assert statuses and set(statuses) == {"equivocation"}


def test_a_node_holds_only_sizes_and_timing(cluster, net):
    """The stored bytes a node answers with: the plaintext is not in them, and the header names no
    measure, period or mapping (only an opaque tag, the site's key id, the opening date, sizes)."""
    ref = _ref(net, "secretmeasure")
    message = b"cell TX_HCTZ women 18-39: 7 patients " * 30

    async def run():
        async with _client(cluster, net) as client:
            board = DhtBoard(client, net.context, ref, net.sites["site-a"])
            await board.post("masked", "site-a", message)
            keys = RoundKeys.derive(ref, net.context.secret)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                holdings = [await client.node_holdings(n.address, location(keys.tag, net.sites["site-a"].key_id)) for n in cluster.live()]
                stored = [w for h in holdings if h for w in h]
                if stored:
                    return stored
            raise AssertionError("no node holds the chunks")

    stored = asyncio.run(run())
    for wire in stored:
        assert b"TX_HCTZ" not in wire and b"secretmeasure" not in wire and b"2025" not in wire
        assert decode_chunk(wire).length == len(message)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qis_fhir", "secagg", *args], capture_output=True, timeout=120)


def test_the_secagg_commands_take_the_step_due_and_refuse_the_others(cluster, net, tmp_path):
    """``qis-fhir secagg`` on the real clock: today's round is in its advertise window."""
    ref = _ref(net, "cli")
    round_file = tmp_path / "round.json"
    round_file.write_bytes(orjson.dumps(dataclasses.asdict(ref)))
    vector = tmp_path / "vector.npy"
    np.save(vector, np.arange(10, dtype=np.uint64))
    common = ["--round", str(round_file), "--network", str(net.net_dir), "--state-dir", str(tmp_path / "state"),
              "--bootstrap", f"{LOOPBACK}:{cluster.nodes[0].port}", "--ksize", str(KSIZE), "--bind", LOOPBACK, "--json"]
    site = ["--site", str(net.sites["site-a"].site_dir)]

    first = _cli("run", *common, *site, "--vector", str(vector))
    assert first.returncode == 0, first.stderr.decode()
    assert json.loads(first.stdout)["posted"] == "advertise"
    np.save(vector, np.arange(1, 11, dtype=np.uint64))
    changed = _cli("contribute", *common, *site, "--vector", str(vector))
    assert changed.returncode == ExitCode.ROUND_REPEATED and b"one contribution per site" in changed.stderr
    early_reveal = _cli("reveal", *common, *site)
    assert early_reveal.returncode == ExitCode.ROUND_WINDOW and b"advertise window" in early_reveal.stderr
    early_unmask = _cli("unmask", *common, "--cells", "10")
    assert early_unmask.returncode == ExitCode.ROUND_WINDOW


def test_a_round_file_of_another_network_is_refused(net, tmp_path):
    round_file = tmp_path / "round.json"
    round_file.write_bytes(orjson.dumps(dataclasses.asdict(RoundRef("other-net", "v1", "sbp", "2025", "presence", TODAY))))
    done = _cli("unmask", "--round", str(round_file), "--network", str(net.net_dir), "--state-dir", str(tmp_path),
                "--bootstrap", f"{LOOPBACK}:9", "--cells", "3")
    assert done.returncode == ExitCode.USAGE and b"round of network other-net" in done.stderr


def test_the_rounds_command_needs_a_run_folder_past_its_packets(net, tmp_path):
    (tmp_path / "run").mkdir()
    done = _cli("rounds", "--run", str(tmp_path / "run"), "--measure", "systolic_bp", "--period", "2024",
                "--site", str(net.sites["site-a"].site_dir), "--network", str(net.net_dir), "--state-dir", str(tmp_path / "state"),
                "--bootstrap", f"{LOOPBACK}:9")
    assert done.returncode == ExitCode.INPUT_NOT_FOUND and b"is not a run folder: secure rounds read a run past its packets" in done.stderr
