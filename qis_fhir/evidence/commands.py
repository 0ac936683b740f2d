"""``qis-fhir evidence`` (collect and pool the network's packets) and ``qis-fhir report`` (rebuild the report)."""

from __future__ import annotations

from pathlib import Path

import click

from qis_fhir.dht.commands import bind_option


@click.command()
@click.option("--site", "site_dir", required=True, type=click.Path(path_type=Path), help="Site directory from `qis-fhir keys new`.")
@click.option("--network", "network_dir", required=True, type=click.Path(path_type=Path), help="Network manifest (or its directory, with network.secret).")
@click.option("--bootstrap", required=True, help="HOST:PORT[,HOST:PORT] of DHT nodes to ask.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None, help="Folder of this site's `qis-fhir run`: its own figures go beside the network's.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder: tables and report go to OUT/evidence/.")
@click.option("--mapping", "mapping_dir", type=click.Path(path_type=Path), default=None, help="Mapping set directory (default: mappings/v2).")
@bind_option
def evidence(site_dir: Path, network_dir: Path, bootstrap: str, run_dir: Path | None, out_dir: Path, mapping_dir: Path | None,
             bind: str | None) -> None:
    """Ask the network for every cohort of the mapping, verify, pool, and write tables and a report."""
    from qis_fhir.dht.address import client_bind, parse_addresses
    from qis_fhir.evidence.stage import EvidenceConfig, run_evidence

    boot = parse_addresses(bootstrap)
    result = run_evidence(EvidenceConfig(
        site_dir=site_dir, network_dir=network_dir, bootstrap=tuple(boot),
        out_dir=out_dir, run_dir=run_dir, mapping_dir=mapping_dir, bind=client_bind(bind, boot),
    ))
    echo_summary(result.provenance, result.paths)


def echo_summary(provenance: dict, paths: dict[str, Path]) -> None:
    """A few lines a user reads after the stage: who answered, what was used and refused, where the files are."""
    sites = ", ".join(f"{s['site']} ({s['packets']} packets, data of {s['as_of']})" for s in provenance["sites"]) or "none"
    rejected = ", ".join(f"{r} {n}" for r, n in provenance["packets_rejected"].items()) or "none"
    click.echo(f"evidence: {provenance['cells']} cells from {provenance['packets_used']} packets; sites: {sites}")
    click.echo(f"  you are {provenance['local_site']}; rejected: {rejected}")
    for name, path in paths.items():
        click.echo(f"  {name}: {path}")


@click.command()
@click.argument("evidence_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(evidence_dir: Path) -> None:
    """Rebuild the HTML report from the tables in EVIDENCE_DIR (or EVIDENCE_DIR/evidence) alone."""
    from qis_fhir.evidence.report import write_report
    from qis_fhir.evidence.stage import evidence_dir_of

    click.echo(f"report: {write_report(evidence_dir_of(evidence_dir))}")
