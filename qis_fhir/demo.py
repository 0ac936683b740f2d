"""``qis-fhir demo``: several hospitals, one network, no central server, on this machine only.

What it does, with embedded defaults (every step is the same library call a real deployment makes):
1. creates a network (governance key, fingerprint secret, signed manifest) and one site per hospital;
2. generates a synthetic FHIR bulk export per hospital (different seeds and population profiles);
3. starts DHT node processes on 127.0.0.1 (free ports); hospitals publish through any of them;
4. runs every hospital's nightly pipeline: extract, outcomes, quality, signed packets, publish;
5. has every hospital look up its own cohorts' fingerprints and reports what came back from whom;
6. once every hospital has published, runs each hospital's evidence stage: the whole cohort grid
   queried, verified and pooled into ``sites/<id>/run/evidence/`` (tables and report);
7. stops every node it started, by process id, whatever happened.

Everything is written under ``--out``; ``demo_summary.json`` holds the figures printed at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import click

from qis_fhir.files import write_json

log = logging.getLogger(__name__)

DEMO_MARKER = ".qis-fhir-demo"

HOSPITALS: tuple[tuple[str, str], ...] = (
    ("st-mary", "default"),
    ("riverside", "urban"),
    ("valley-general", "rural"),
    ("northgate", "elderly"),
    ("harbour-view", "default"),
)


@dataclass(frozen=True)
class DemoConfig:
    out_dir: Path
    sites: int = 4
    patients: int = 3000
    seed: int = 1
    nodes: int = 8
    ksize: int = 5


def _site_run(site_id: str, profile: str, index: int, config: DemoConfig, net_dir: Path, bootstrap) -> dict:
    from qis_fhir.dht.cluster import LOOPBACK
    from qis_fhir.packets import add_site, create_site
    from qis_fhir.pipeline import PACKETS, RunConfig, run_pipeline
    from qis_fhir.synth import generate_export

    root = config.out_dir / "sites" / site_id
    site_dir = root / "keys"
    create_site(site_id, site_dir)
    add_site(net_dir, site_dir)
    export = root / "export"
    generate_export(export, patients=config.patients, seed=config.seed * 1000 + index, site_profile=profile,
                    truth_path=root / "planted_effects.json", overwrite=True)
    result = run_pipeline(
        RunConfig(export_dir=export, out_dir=root / "run", site_dir=site_dir, network_dir=net_dir, bootstrap=tuple(bootstrap),
                  bind=(LOOPBACK, 0), evidence=False)  # evidence once every hospital has published (run_demo)
    )
    return {
        "site_id": site_id,
        "profile": profile,
        "accepted": result.extract["totals"]["accepted"],
        "quarantined": result.extract["totals"]["quarantined"],
        "events": int(result.outcomes.get("totals", {}).get("events", 0)),
        "packets": result.packets["packets"] if result.packets else 0,
        "publish": result.publish,
        "packets_path": str(result.out_dir / PACKETS),
        "site_dir": str(site_dir),
        "run_dir": str(result.out_dir),
    }


def _site_evidence(site: dict, net_dir: Path, bootstrap) -> dict:
    """One hospital's evidence stage, and the few biggest rows of its pooled table to print."""
    from qis_fhir.dht.cluster import LOOPBACK
    from qis_fhir.stages import evidence_step, open_site

    setup = open_site(site_dir=Path(site["site_dir"]), network_dir=net_dir)
    result = evidence_step(Path(site["run_dir"]), setup, tuple(bootstrap), (LOOPBACK, 0))
    prov = result.provenance
    return {
        "site_id": site["site_id"],
        "label": prov["local_site"],
        "cells": prov["cells"],
        "packets_used": prov["packets_used"],
        "packets_rejected": prov["packets_rejected"],
        "sites": [s["site"] for s in prov["sites"]],
        "pooled_table": str(result.paths["pooled_outcomes_csv"]),
        "report": str(result.paths.get("report", "")),
        "top_rows": _top_rows(result.paths["pooled_outcomes"]),
    }


def _top_rows(path: Path, n: int = 3) -> list[str]:
    """The ``n`` cells with the most pooled patients, one line each (figures per cell, never summed)."""
    import pandas as pd

    df = pd.read_parquet(path)
    df = df.sort_values(["patients", "condition", "treatment", "period"], ascending=[False, True, True, True]).head(n)
    return [
        f"{r.condition_display} {r.age_band} {r.sex}, {r.treatment_display}, {r.period}: {r.patients} patients at "
        f"{r.sites} hospitals, {r.responders / r.patients:.0%} responded"
        + (f" (here: {int(r.local_patients)} patients)" if pd.notna(r.local_patients) else " (none here)")
        for r in df.itertuples()
    ]


def run_demo(config: DemoConfig) -> dict:
    """Run the whole demo; returns the summary also written to ``demo_summary.json``."""
    from qis_fhir.dht.client import query_many
    from qis_fhir.dht.cluster import LOOPBACK, LocalCluster
    from qis_fhir.packets import create_network, decode_packet, read_packets
    from qis_fhir.packets.manifest import MANIFEST

    if not 1 <= config.sites <= len(HOSPITALS):
        raise click.BadParameter(f"--sites must be between 1 and {len(HOSPITALS)}")
    out = config.out_dir
    if out.exists() and any(out.iterdir()):
        # Re-running the README's command replaces the previous demo; any other folder is left alone.
        if not (out / DEMO_MARKER).exists():
            raise click.UsageError(f"{out} is not empty and was not written by a demo; choose an empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by qis-fhir demo; a new demo run replaces this folder\n")
    started = time.monotonic()
    net_dir = out / "network"
    create_network(net_dir, network_id="demo-network", min_cell_size=11)
    manifest = net_dir / MANIFEST
    hospitals = HOSPITALS[: config.sites]

    summary: dict = {"sites": [], "lookups": [], "evidence": []}
    cluster = LocalCluster(out / "nodes", manifest, ksize=config.ksize)
    try:
        # Sites join the manifest as they go; nodes re-read it on an unknown key, so start them first.
        cluster.start(max(config.nodes, config.ksize + 1))
        cluster.wait_joined()
        bootstrap = [node.address for node in cluster.live()[:2]]
        click.echo(f"network: {len(cluster.live())} DHT nodes on {LOOPBACK}, ksize {config.ksize}", err=True)
        for index, (site_id, profile) in enumerate(hospitals):
            click.echo(f"{site_id}: synthetic export ({config.patients} patients, {profile}), pipeline, publish", err=True)
            summary["sites"].append(_site_run(site_id, profile, index, config, net_dir, bootstrap))

        # Every hospital looks up the fingerprints of its own cohorts and sees who else contributed.
        for site in summary["sites"]:
            own = [decode_packet(w) for w in read_packets(Path(site["packets_path"]))]
            fingerprints = sorted({p.fingerprint for p in own})
            results = query_many(fingerprints, [cluster.live()[-1].address], manifest, bind=LOOPBACK) if fingerprints else {}
            per_site: dict[str, int] = defaultdict(int)
            missing_own = 0
            for fp, res in results.items():
                got = {(p.site_id, p.packet_id) for p in res.packets}
                missing_own += sum(1 for p in own if p.fingerprint == fp and (p.site_id, p.packet_id) not in got)
                for p in res.packets:
                    per_site[p.site_id] += 1
            summary["lookups"].append(
                {
                    "site_id": site["site_id"],
                    "fingerprints": len(fingerprints),
                    "packets_returned_by_site": dict(sorted(per_site.items())),
                    "own_packets_missing": missing_own,
                    "max_hops": max((r.hops for r in results.values()), default=0),
                }
            )

        # Every hospital has published: each one's evidence stage now sees the whole network.
        for site in summary["sites"]:
            click.echo(f"{site['site_id']}: evidence (every cohort of the mapping, verified and pooled)", err=True)
            summary["evidence"].append(_site_evidence(site, net_dir, [cluster.live()[0].address]))
    finally:
        cluster.stop_all()
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(out / "demo_summary.json", summary)
    return summary


def _print_summary(summary: dict) -> None:
    click.echo("\nsite              accepted  quarantined  events  packets  confirmed")
    for s in summary["sites"]:
        confirmed = (s["publish"] or {}).get("confirmed", "-")
        click.echo(f"{s['site_id']:<16} {s['accepted']:>9} {s['quarantined']:>12} {s['events']:>7} {s['packets']:>8} {confirmed!s:>10}")
    click.echo("\nlookups of each site's own cohort fingerprints (packets returned, by contributing site):")
    for q in summary["lookups"]:
        by_site = ", ".join(f"{k} {v}" for k, v in q["packets_returned_by_site"].items())
        click.echo(f"  {q['site_id']}: {q['fingerprints']} fingerprints -> {by_site}; own missing {q['own_packets_missing']}, max hops {q['max_hops']}")
    click.echo("\nevidence each hospital got back (pooled over the network, its own figures beside them):")
    for e in summary["evidence"]:
        rejected = ", ".join(f"{k} {v}" for k, v in e["packets_rejected"].items()) or "none rejected"
        click.echo(f"  {e['site_id']} (labelled {e['label']} in its report): {e['cells']} cells from {e['packets_used']} packets "
                   f"of {', '.join(e['sites'])}; {rejected}")
        click.echo(f"    table:  {e['pooled_table']}")
        click.echo(f"    report: {e['report']}")
        for line in e["top_rows"]:
            click.echo(f"      {line}")
    click.echo(f"\ndone in {summary['elapsed_s']} s")


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True, help="Empty directory for everything the demo writes.")
@click.option("--sites", type=click.IntRange(1, len(HOSPITALS)), default=4, show_default=True, help="Hospitals in the network.")
@click.option("--nodes", type=click.IntRange(min=1), default=8, show_default=True, help="DHT node processes (at least ksize + 1 are started).")
@click.option("--patients", type=click.IntRange(min=50), default=3000, show_default=True, help="Patients per hospital.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--ksize", type=click.IntRange(min=2), default=5, show_default=True, help="DHT replication factor.")
def demo(out_dir: Path, sites: int, nodes: int, patients: int, seed: int, ksize: int) -> None:
    """Multi-hospital demo on 127.0.0.1: synthetic exports -> packets -> DHT -> pooled evidence per hospital."""
    summary = run_demo(DemoConfig(out_dir=out_dir, sites=sites, patients=patients, seed=seed, nodes=nodes, ksize=ksize))
    _print_summary(summary)
    if any(q["own_packets_missing"] for q in summary["lookups"]):
        raise click.ClickException("some published packets could not be found again")
