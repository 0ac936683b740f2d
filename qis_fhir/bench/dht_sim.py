"""``qis-fhir bench --only dht-sim``: lookup hops and recall against log2 N, far past what real nodes reach.

Each network size runs :func:`qis_fhir.dht.sim.experiment` (the real lookup code over simulated
datagrams on a virtual clock, see ``qis_fhir/dht/sim.py``) in a child process of its own, so its
peak RSS is its own: build N nodes by the real join, publish 100 keys x 5 packets on k = 8
replicas, let ``--churn`` of the nodes leave without a word and as many new ones join, query every
key from a fresh client. For N up to 3,000 it also runs the join as it was before the subtree
refresh (``join_refresh=False``), which is what ``qis-fhir bench --only dht`` measured at 3,000 real
nodes: recall below 1.0 with no churn, no loss and no load. ``--build converged`` constructs the
converged tables instead of simulating the joins (``SimNetwork.build_converged``: about 10 times
less CPU at 10,000 nodes, 1.7 times the memory) and runs only that build at every size.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import replace
from typing import Any

from qis_fhir.dht.sim import SimConfig

DEFAULT_SIZES = (10, 100, 1000, 3000)
COMPARE_UP_TO = 3000  # sizes at which the join without refresh runs too (it is about 8x cheaper)


def _one(n: int, churn: float, config: Any, build: str, out: Any) -> None:
    from qis_fhir.dht.sim import experiment

    out.put(experiment(n, churn=churn, config=config, build=build))


def _in_child(n: int, churn: float, config: Any, build: str = "join") -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_one, args=(n, churn, config, build, queue))
    proc.start()
    try:
        result = queue.get()
    finally:
        proc.join()
    return result


def run(options: Any) -> dict:
    sizes = tuple(getattr(options, "nodes", None) or DEFAULT_SIZES)
    churn = getattr(options, "churn", None)
    churn = 0.1 if churn is None else churn
    loss = getattr(options, "loss", None) or 0.0
    out: dict = {
        "method": "qis_fhir.dht.sim: real iterative_lookup / lookup_until_found / RoutingTable over simulated datagrams "
        f"(RTT log-normal, median 20 ms, p95 60 ms; loss {loss}; timeout 3 s, 1 retry) on a virtual clock; k=8, alpha=3; "
        f"100 keys x 5 packets; {churn:.0%} of nodes leave and as many join between publish and query; no hand-off or republish",
        "churn": churn,
        "by_nodes": {},
    }
    config = SimConfig(loss=loss, seed=getattr(options, "seed", 7))
    build = getattr(options, "build", "join")
    if build == "converged":  # constructed tables: the join variants are not what is measured
        out["method"] += "; network built as converged tables (no join traffic), newcomers after churn likewise"
        out["by_nodes"] = {str(n): {"converged": _in_child(n, churn, config, build)} for n in sizes}
        return out
    for n in sizes:
        row = {"join_refresh": _in_child(n, churn, config)}
        if n <= COMPARE_UP_TO:
            row["join_without_refresh"] = _in_child(n, churn, replace(config, join_refresh=False))
        out["by_nodes"][str(n)] = row
    return out
