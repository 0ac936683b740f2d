"""``qis-fhir run``: every stage built so far on one export (see ``qis_fhir.pipeline``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qis_fhir.dht.commands import bind_option
from qis_fhir.fhir.commands import workers_option
from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE, MODES


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="The run's folder; replaced only once the new run is complete (it is written in OUT.partial first).")
@click.option("--mapping", "mapping_dir", type=click.Path(path_type=Path), default=None, help="Mapping set directory (default: mappings/v2).")
@click.option("--site", "site_dir", type=click.Path(path_type=Path), default=None, help="Site directory from `qis-fhir keys new`: sign packets with its key.")
@click.option("--network", "network_dir", type=click.Path(path_type=Path), default=None, help="Network manifest (or its directory) from `qis-fhir network new`.")
@click.option("--bootstrap", default=None, help="HOST:PORT[,HOST:PORT] of DHT nodes: publish the run's packets, then pool the network's evidence as the last stage.")
@bind_option
@click.option("--site-secret", "site_secret_path", type=click.Path(path_type=Path), default=None, help="Patient-key secret when no --site is given (default: $QIS_FHIR_HOME/site.secret).")
@click.option("--validate", type=click.Choice(MODES), default=DEFAULT_VALIDATE, show_default=True, help="pydantic model validation of resources.")
@click.option("--sample-rate", type=click.FloatRange(0.0, 1.0), default=DEFAULT_SAMPLE_RATE, show_default=True, help="Share of resources model-validated with --validate sample.")
@click.option("--seq", type=click.IntRange(min=0), default=None, help="The day the export stands for, as YYYYMMDD (default: today, UTC): packets carry seq = day x 100 + revision, and a day older than the newest released one releases nothing (docs/packets.md).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@workers_option
def run(export_dir: Path, out_dir: Path, mapping_dir, site_dir, network_dir, bootstrap, bind, site_secret_path, validate, sample_rate, seq, progress,
        workers) -> None:
    """Run extract, outcomes and quality (and packets / publish when asked) on EXPORT_DIR."""
    import sys

    from qis_fhir.dht.address import client_bind, parse_addresses
    from qis_fhir.pipeline import RunConfig, run_pipeline

    boot = parse_addresses(bootstrap)
    config = RunConfig(
        export_dir=export_dir,
        out_dir=out_dir,
        mapping_dir=mapping_dir,
        site_dir=site_dir,
        network_dir=network_dir,
        bootstrap=tuple(boot),
        bind=client_bind(bind, boot),  # checked now, not after hours of extraction
        site_secret_path=site_secret_path,
        validate=validate,
        sample_rate=sample_rate,
        seq=seq,
        progress=(sys.stderr.isatty() if progress is None else progress) and workers == 1,
        workers=workers,
    )
    result = run_pipeline(config)
    totals = result.extract.get("totals", {})
    click.echo(
        f"extract: {totals.get('read', 0)} read, {totals.get('accepted', 0)} accepted, "
        f"{totals.get('quarantined', 0)} quarantined"
    )
    click.echo(f"outcomes: {json.dumps(result.outcomes.get('totals', {}), sort_keys=True)}")
    if result.packets is not None:
        click.echo(f"packets: {result.packets['packets']} signed")
    if result.publish is not None:
        click.echo(f"publish: {json.dumps(result.publish.get('totals', result.publish), sort_keys=True)[:300]}")
    if result.evidence is not None:
        from qis_fhir.evidence.commands import echo_summary

        echo_summary(result.evidence["provenance"], {})
    for name, path in result.outputs().items():
        click.echo(f"  {name}: {path}")
