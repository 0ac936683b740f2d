"""``qis-fhir bench``: run benchmark sections and print one JSON object.

Each section is a module ``qis_fhir/bench/<section>.py`` with ``run(options: BenchOptions) -> dict``.
Sections compare rates measured side by side in the same run (ratios), because these machines are
shared and noisy: absolute seconds mean little, ratios measured together mean a lot.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

SECTIONS: dict[str, str] = {
    "extract": "qis_fhir.bench.extract",
    "packets": "qis_fhir.bench.packets",
    "dht": "qis_fhir.bench.dht",
    "dhtflood": "qis_fhir.bench.dht_flood",
    "dht-sim": "qis_fhir.bench.dht_sim",
    "quality": "qis_fhir.bench.quality",
    "evidence": "qis_fhir.bench.evidence",
    "secagg": "qis_fhir.bench.secagg",
    "rounds": "qis_fhir.bench.rounds",
    "run": "qis_fhir.bench.run",
}
# dht, evidence, rounds and dhtflood start many nodes, run writes exports of millions of Observations:
# ask for them with --only
DEFAULT_SECTIONS = ("extract", "packets")


@dataclass(frozen=True)
class BenchOptions:
    observations: int | None = None  # extract: size of the synthetic export (None: the section's default)
    export: Path | None = None  # extract: time the Observation lines of this export instead
    nodes: tuple[int, ...] | None = None  # dht, dht-sim: network sizes
    churn: float | None = None  # dht-sim: fraction of nodes that leave (and as many join) between publish and query
    loss: float | None = None  # dht-sim: probability that a datagram is lost
    build: str = "join"  # dht-sim: build the network by the real join, or construct converged tables
    seed: int = 7
    sizes: tuple[int, ...] | None = None  # run: Observations of each export
    workers: int | None = None  # run: worker processes of the runs per size
    repeats: int = 3  # run: pairs of 1- and 2-worker runs for the speed-up, and runs of every other size


def run_sections(sections: list[str], options: BenchOptions) -> dict:
    results: dict = {}
    for name in sections:
        module = importlib.import_module(SECTIONS[name])
        click.echo(f"bench: running {name} ...", err=True)
        results[name] = module.run(options)
    return results


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the default prints it indented).")
@click.option(
    "--only",
    "only",
    multiple=True,
    type=click.Choice(sorted(SECTIONS)),
    help="Run only this section (repeatable). Default: " + ", ".join(DEFAULT_SECTIONS) + ".",
)
@click.option("--observations", type=click.IntRange(min=1000), default=None, help="Observations in the extract benchmark's synthetic export (default 200,000).")
@click.option(
    "--export",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="extract: time your own export's Observation lines (repeated up to --observations) instead of a synthetic export.",
)
@click.option("--nodes", type=str, default=None, help="dht, dht-sim: comma-separated network sizes, e.g. 10,30,100; evidence: the first is its network size (default 30); secagg: the first is its number of sites (default 50).")
@click.option("--churn", type=click.FloatRange(0.0, 0.9), default=None, help="dht-sim: fraction of nodes that leave, and as many that join, between publish and query (default 0.1).")
@click.option("--loss", type=click.FloatRange(0.0, 0.9), default=None, help="dht-sim: probability that one datagram is lost (default 0).")
@click.option("--build", type=click.Choice(["join", "converged"]), default="join", show_default=True,
              help="dht-sim: build the network by the real join of every node, or construct the tables a converged network has (docs/dht.md, \"Scale\").")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--sizes", type=str, default=None, help="run: comma-separated Observations per export (default 2000000,5000000,20000000).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="run: worker processes of the run per size (default 1).")
@click.option("--repeats", type=click.IntRange(min=0), default=3, show_default=True,
              help="run: pairs of 1- and 2-worker runs back to back on the first size, for the speed-up's median, and as many runs of every other size, for its time per Observation's (0: one run a size).")
def bench(as_json: bool, only: tuple[str, ...], observations: int | None, export: Path | None, nodes: str | None,
          churn: float | None, loss: float | None, build: str, seed: int, sizes: str | None, workers: int | None, repeats: int) -> None:
    """Measure throughput and memory of the stages, side by side with their baselines."""
    sections = list(only) or list(DEFAULT_SECTIONS)
    node_sizes = tuple(int(x) for x in nodes.split(",")) if nodes else None
    run_sizes = tuple(int(x) for x in sizes.split(",")) if sizes else None
    results = run_sections(sections, BenchOptions(observations=observations, export=export, nodes=node_sizes, churn=churn, loss=loss,
                                                  build=build, seed=seed, sizes=run_sizes, workers=workers, repeats=repeats))
    text = json.dumps(results, sort_keys=True) if as_json else json.dumps(results, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
