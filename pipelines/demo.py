"""``qis-fhir demo``: several hospitals, one network, no central server, on this machine only.

What it does, with embedded defaults (every step is what a real deployment runs):
1. creates a network (governance key, fingerprint secret, signed manifest) and one site per hospital;
2. generates a synthetic FHIR bulk export per hospital (different seeds and population profiles);
3. starts DHT node processes on 127.0.0.1 (free ports); hospitals publish through any of them;
4. runs every hospital's nightly Dagster job (``daily_outcomes``, the production Definitions bound to
   that hospital, ``pipelines.nightly``) in this process for yesterday's partition, up to its
   published packets: export observed, extract, checks, outcomes, signed packets, publish, and its
   events in its DuckDB file; every run is recorded in one Dagster instance, ``<out>/dagster_home``;
5. has every hospital look up its own cohorts' fingerprints and reports what came back from whom;
6. once every hospital has published, runs each hospital's network view (``evidence_tables``,
   ``pooled_outcomes_table``): the whole cohort grid queried, verified and pooled into
   ``sites/<id>/out/<day>/evidence/`` (tables and report) and the hospital's database;
7. with ``--ui``, ``dagster dev`` on that instance (127.0.0.1, a free port, configured for the first
   hospital) to inspect the lineage and the runs, until Ctrl-C;
8. stops everything it started, by process id, whatever happened.

Everything is written under ``--out``; ``demo_summary.json`` holds the figures printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipelines.dev import stop_dev
from pipelines.warehouse import DATABASE_FILE
from qis_fhir.files import write_json

if TYPE_CHECKING:
    from dagster import Definitions

    from pipelines.resources import DhtConfig, SiteConfig

log = logging.getLogger(__name__)

DEMO_MARKER = ".qis-fhir-demo"
#: the runs' console log: warnings and failures only (every event is in the instance, for the UI)
DAGSTER_LOG_LEVEL = "WARNING"

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


@dataclass(frozen=True)
class DemoSite:
    """One hospital of the demo: its paths, and its Definitions (the production ones bound to it)."""

    site_id: str
    profile: str
    root: Path
    site: SiteConfig
    dht: DhtConfig
    defs: Definitions

    def run_dir(self, partition: str) -> Path:
        return self.site.out_path(partition)


def _create_site(site_id: str, profile: str, index: int, config: DemoConfig, net_dir: Path, bootstrap) -> DemoSite:
    """The hospital's keys (joined to the network) and synthetic export, and its resources."""
    from pipelines.nightly import site_definitions
    from pipelines.resources import DhtConfig, SiteConfig
    from qis_fhir.dht.cluster import LOOPBACK
    from qis_fhir.packets import add_site, create_site
    from qis_fhir.synth import generate_export

    root = config.out_dir / "sites" / site_id
    create_site(site_id, root / "keys")
    add_site(net_dir, root / "keys")
    export = root / "export"
    generate_export(export, patients=config.patients, seed=config.seed * 1000 + index, site_profile=profile,
                    truth_path=root / "planted_effects.json", overwrite=True)
    site = SiteConfig(export_dir=str(export), out_root=str(root / "out"), site_dir=str(root / "keys"), network_dir=str(net_dir))
    dht = DhtConfig(bootstrap=",".join(f"{h}:{p}" for h, p in bootstrap), bind=LOOPBACK)
    return DemoSite(site_id, profile, root, site, dht, site_definitions(site, dht))


def _site_nightly(site: DemoSite, partition: str, instance) -> dict:
    """The hospital's own part of its nightly job, and what its run folder says about it."""
    from pipelines.nightly import SITE_TAG, run_nightly
    from qis_fhir.packets.build import PACKETS_FILE
    from qis_fhir.runfolder import read_manifest
    from qis_fhir.stages import PUBLISH_REPORT

    run_nightly(site.defs, partition, instance, part="site", tags={SITE_TAG: site.site_id}, log_level=DAGSTER_LOG_LEVEL)
    folder = site.run_dir(partition)
    counts = read_manifest(folder)["counts"]
    return {
        "site_id": site.site_id,
        "profile": site.profile,
        "accepted": counts["extract"]["accepted"],
        "quarantined": counts["extract"]["quarantined"],
        "events": int(counts["outcomes"].get("events", 0)),
        "packets": counts["packets"]["packets"],
        "publish": json.loads((folder / PUBLISH_REPORT).read_text()),
        "packets_path": str(folder / PACKETS_FILE),
        "site_dir": site.site.site_dir,
        "run_dir": str(folder),
    }


def _site_evidence(site: DemoSite, partition: str, instance) -> dict:
    """The hospital's network view (pooled evidence, its database table), and the few biggest rows to print."""
    from pipelines.nightly import SITE_TAG, run_nightly
    from qis_fhir.evidence.report import POOLED_NAME, PROVENANCE_NAME, REPORT_NAME
    from qis_fhir.evidence.tables import EVIDENCE_DIR, POOLED_CSV

    run_nightly(site.defs, partition, instance, part="network", tags={SITE_TAG: site.site_id}, log_level=DAGSTER_LOG_LEVEL)
    evidence = site.run_dir(partition) / EVIDENCE_DIR
    prov = json.loads((evidence / PROVENANCE_NAME).read_text())
    return {
        "site_id": site.site_id,
        "label": prov["local_site"],
        "cells": prov["cells"],
        "packets_used": prov["packets_used"],
        "packets_rejected": prov["packets_rejected"],
        "sites": [s["site"] for s in prov["sites"]],
        "pooled_table": str(evidence / POOLED_CSV),
        "report": str(evidence / REPORT_NAME),
        "database": str(Path(site.site.out_root) / DATABASE_FILE),
        "top_rows": _top_rows(evidence / POOLED_NAME),
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


def run_demo(config: DemoConfig, *, ui: bool = False, show: Callable[[dict], None] | None = None) -> dict:
    """Run the whole demo; returns the summary also written to ``demo_summary.json`` (and passed to
    ``show`` before a ``--ui`` demo waits for Ctrl-C)."""
    from dagster import DagsterInstance

    from pipelines.dev import prepare_home
    from pipelines.partitions import daily_exports
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
    home = prepare_home(out / "dagster_home")  # the runs' history, and the --ui's instance
    partition = daily_exports.get_last_partition_key()  # the night that just ended, as the schedule runs it

    summary: dict = {"partition": partition, "dagster_home": str(home), "sites": [], "lookups": [], "evidence": []}
    cluster = LocalCluster(out / "nodes", manifest, ksize=config.ksize)
    dev = None
    try:
        # Sites join the manifest as they go; nodes re-read it on an unknown key, so start them first.
        cluster.start(max(config.nodes, config.ksize + 1))
        cluster.wait_joined()
        bootstrap = [node.address for node in cluster.live()[:2]]
        click.echo(f"network: {len(cluster.live())} DHT nodes on {LOOPBACK}, ksize {config.ksize}", err=True)
        sites = []
        for index, (site_id, profile) in enumerate(HOSPITALS[: config.sites]):
            click.echo(f"{site_id}: keys, synthetic export ({config.patients} patients, {profile})", err=True)
            sites.append(_create_site(site_id, profile, index, config, net_dir, bootstrap))
        if ui:
            dev, summary["ui"] = _start_ui(out, home, sites[0])
        with DagsterInstance.from_config(str(home)) as instance:
            for site in sites:
                click.echo(f"{site.site_id}: Dagster job daily_outcomes, partition {partition}, up to published_packets", err=True)
                summary["sites"].append(_site_nightly(site, partition, instance))

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

            # Every hospital has published: each one's network view now pools the whole network.
            for site in sites:
                click.echo(f"{site.site_id}: Dagster job daily_outcomes, evidence_tables and pooled_outcomes_table", err=True)
                summary["evidence"].append(_site_evidence(site, partition, instance))
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(out / "demo_summary.json", summary)
        if show is not None:
            show(summary)
        if dev is not None:
            _wait_for_ctrl_c(dev, summary["ui"])
    finally:
        if dev is not None:
            left = stop_dev(dev)
            if left:
                log.warning("dagster dev processes had to be killed: %s", ", ".join(left))
        cluster.stop_all()
    return summary


def _start_ui(out: Path, home: Path, site: DemoSite) -> tuple[subprocess.Popen, str]:
    """``dagster dev`` on the demo's instance, configured (``QIS_*``) as the first hospital, on a free port."""
    from pipelines.dev import free_port, start_dev, wait_for_ui
    from pipelines.resources import DHT_ENVIRONMENT, ENVIRONMENT

    env = {var: str(value) for resource, variables in ((site.site, ENVIRONMENT), (site.dht, DHT_ENVIRONMENT))
           for var, field in variables.items() if (value := getattr(resource, field)) is not None}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    click.echo(f"dagster dev on {url} (log: {out / 'dagster-dev.log'}), as {site.site_id}", err=True)
    proc = start_dev(home, port, out / "dagster-dev.log", env=env)
    try:
        wait_for_ui(f"{url}/server_info", proc)
    except (RuntimeError, TimeoutError) as exc:
        stop_dev(proc)
        raise click.ClickException(f"{exc}; see {out / 'dagster-dev.log'}") from None
    return proc, url


def _stop_on_interrupt_or_term() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (a supervisor, ``kill``) both stop the demo through its clean-up,
    which stops every process it started, even when it was started with them ignored: a background
    job of a non-interactive shell inherits SIGINT ignored, and then no signal but SIGKILL stopped it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _wait_for_ctrl_c(dev: subprocess.Popen, url: str) -> None:
    """Block until Ctrl-C (the normal end of a --ui demo) or until dagster dev exits on its own."""
    click.echo(f"\nDagster UI: {url}/asset-groups (lineage), {url}/runs (the demo's runs). Ctrl-C stops it and the DHT nodes.")
    try:
        while dev.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                dev.wait(timeout=1.0)
    except KeyboardInterrupt:
        click.echo("stopping dagster dev and the DHT nodes", err=True)
        return
    raise click.ClickException(f"dagster dev exited with {dev.returncode}")


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
        click.echo(f"    table:    {e['pooled_table']}")
        click.echo(f"    report:   {e['report']}")
        click.echo(f"    database: {e['database']} (tables qis_fhir.pooled_outcomes_table, qis_fhir.outcome_events_table)")
        for line in e["top_rows"]:
            click.echo(f"      {line}")
    click.echo(f"\ndone in {summary['elapsed_s']} s; the Dagster runs of partition {summary['partition']} are in {summary['dagster_home']}")


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True, help="Empty directory for everything the demo writes.")
@click.option("--sites", type=click.IntRange(1, len(HOSPITALS)), default=4, show_default=True, help="Hospitals in the network.")
@click.option("--nodes", type=click.IntRange(min=1), default=8, show_default=True, help="DHT node processes (at least ksize + 1 are started).")
@click.option("--patients", type=click.IntRange(min=50), default=3000, show_default=True, help="Patients per hospital.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--ksize", type=click.IntRange(min=2), default=5, show_default=True, help="DHT replication factor.")
@click.option("--ui", is_flag=True, help="Also start dagster dev on the demo's instance (127.0.0.1, a free port) until Ctrl-C.")
def demo(out_dir: Path, sites: int, nodes: int, patients: int, seed: int, ksize: int, ui: bool) -> None:
    """Multi-hospital demo on 127.0.0.1: synthetic exports -> each hospital's nightly Dagster job -> DHT -> pooled evidence per hospital."""
    _stop_on_interrupt_or_term()
    summary = run_demo(DemoConfig(out_dir=out_dir, sites=sites, patients=patients, seed=seed, nodes=nodes, ksize=ksize), ui=ui,
                       show=_print_summary)
    if any(q["own_packets_missing"] for q in summary["lookups"]):
        raise click.ClickException("some published packets could not be found again")
