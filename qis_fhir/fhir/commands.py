"""``qis-fhir extract EXPORT_DIR --out DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qis_fhir.fhir.validation import DEFAULT_SAMPLE_RATE, DEFAULT_VALIDATE, MODES

workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Processes that read the export's files (and, in `run`, validate the quality suites' batches and derive the outcome "
    "shards): the outputs are the same whatever the number; each takes about 0.25 GiB.")


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--validate",
    type=click.Choice(MODES),
    default=DEFAULT_VALIDATE,
    show_default=True,
    help="fhir.resources R4B model validation on top of the strict field checks: every resource, "
    "a deterministic sample, or none (full costs ~30-70x a JSON parse).",
)
@click.option(
    "--sample-rate",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_SAMPLE_RATE,
    show_default=True,
    help="Share of resources model-validated with --validate sample.",
)
@click.option(
    "--site-secret",
    type=click.Path(path_type=Path),
    default=None,
    help="File holding the site secret for patient keys (created with mode 0600 if missing). "
    "Default: $QIS_FHIR_HOME/site.secret.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@workers_option
def extract(
    export_dir: Path,
    out_dir: Path,
    validate: str,
    sample_rate: float,
    site_secret: Path | None,
    progress: bool | None,
    workers: int,
) -> None:
    """Extract a FHIR bulk export (NDJSON, NDJSON.gz, Bundles) into typed Parquet tables.

    Writes OUT/extract/{patients,conditions,medication_requests,observations}.parquet,
    OUT/extract/summary.json (every line counted), OUT/quarantine.ndjson (every rejected line,
    with its reason, never its content) and OUT/run.json. Patient ids are replaced by keyed pseudonyms.
    OUT is replaced only when the extraction succeeds (see `qis-fhir run`); a failed one stays in OUT.partial.
    Exits with NOTHING_EXTRACTED (6) when no resource at all was accepted.
    """
    from qis_fhir.fhir.extract import QUARANTINE_FILE, extract_export
    from qis_fhir.privacy.secrets import load_or_create_secret
    from qis_fhir.runfolder import EXTRACT, start_run

    secret = load_or_create_secret(site_secret)
    if progress is None:
        progress = sys.stderr.isatty()
    with start_run(out_dir, command="extract", planned=[EXTRACT]) as run:
        summary = extract_export(
            export_dir, run.path, secret=secret, validate=validate, sample_rate=sample_rate, progress=progress and workers == 1,
            workers=workers,
        )
        _print_summary(summary)
        summary.raise_if_nothing_extracted(run.path / QUARANTINE_FILE)
        run.mark(EXTRACT, summary.totals)
    click.echo(f"wrote {out_dir / 'extract'} and {out_dir / QUARANTINE_FILE}")


def _print_summary(summary) -> None:
    t = summary.totals
    click.echo(
        f"read {t['read']:,}  accepted {t['accepted']:,}  quarantined {t['quarantined']:,}  "
        f"skipped {t['skipped']:,}  in {summary.seconds:.1f} s"
    )
    click.echo("rows: " + ", ".join(f"{name} {n:,}" for name, n in summary.rows.items()))
    if summary.quarantine_reasons:
        top = sorted(summary.quarantine_reasons.items(), key=lambda kv: -kv[1])
        click.echo("quarantined by reason: " + ", ".join(f"{r} {n:,}" for r, n in top))
    if summary.skipped_paths:
        click.echo("paths not read: " + ", ".join(f"{r} {n:,}" for r, n in summary.skipped_paths.items()))
    if summary.caps_hit:
        click.echo(f"limits reached in {len(summary.caps_hit):,} file(s): see caps_hit in summary.json")
    validated = f"model-validated: {summary.validated:,} ({summary.validate}"
    if summary.validate == "sample":
        validated += f", rate {summary.validation_sample_rate:g}"
    click.echo(validated + ")")
