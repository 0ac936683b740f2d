"""A whole round on one injected clock: nodes in this event loop (real UDP on 127.0.0.1, the nodes'
own protocol and storage, ``RoundGate`` with the test's clock) and boards on the same clock, moved
from window to window instead of waiting for days."""

from __future__ import annotations

import asyncio

import pytest
from dht_cluster import BASE_SITES, LOOPBACK, Clock, certify_nodes, make_network, start_round_nodes

from qis_fhir.dht.board import DhtBoard
from qis_fhir.dht.client import DhtClient
from qis_fhir.errors import RoundWindowError
from qis_fhir.packets.manifest import load_network
from qis_fhir.secagg.round import PHASES, SCHEDULE, RoundRef

pytestmark = [pytest.mark.timeout(120)]

KSIZE = 3
OPENS = "2026-03-02"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = make_network(tmp_path_factory.mktemp("rounds-clock-net"), BASE_SITES)
    network.node_identities = certify_nodes(network.manifest, 4)
    network.context = load_network(network.manifest)
    return network


def test_a_round_runs_window_by_window_and_the_reveal_waits_for_the_roster(net):
    ref = RoundRef(net.context.manifest.network_id, "v1", "sbp", "2025", "presence", OPENS)
    clock = Clock(SCHEDULE.starts(OPENS) + 3600)

    async def run():
        nodes = await start_round_nodes(net.manifest, clock, net.node_identities, KSIZE)
        try:
            async with DhtClient([(nodes[0].host, nodes[0].port)], net.context.manifest, ksize=KSIZE, bind=LOOPBACK) as client:
                boards = {s: DhtBoard(client, net.context, ref, net.sites[s], clock=clock) for s in BASE_SITES}
                seen = {}
                for phase in PHASES:
                    if phase == "reveal":
                        clock.t = SCHEDULE.closes(OPENS, "masked") + 60  # masked closed, roster still open
                        with pytest.raises(RoundWindowError, match="not open yet"):
                            await boards["site-a"].post("reveal", "site-a", b"too early")
                        clock.t = SCHEDULE.closes(OPENS, "consistency") + 60
                    for s in BASE_SITES[:4]:  # site-e never contributes (a dropout)
                        await boards[s].post(phase, s, f"{phase} of {s}".encode())
                    with pytest.raises(RoundWindowError, match="read after that"):
                        await boards["site-a"].collect(phase)
                    clock.t = SCHEDULE.closes(OPENS, phase) + 60
                    seen[phase] = await boards["site-e"].collect(phase)
                    with pytest.raises(RoundWindowError, match="closed"):
                        await boards["site-e"].post(phase, "site-e", b"after the deadline")
                return seen, sum(node.protocol.rejections["early"] for node in nodes)
        finally:
            for node in nodes:
                node.close()

    seen, early = asyncio.run(run())
    assert seen == {p: {s: f"{p} of {s}".encode() for s in BASE_SITES[:4]} for p in PHASES}
    assert early == 0  # the boards held the schedule themselves: nothing early ever reached a node
