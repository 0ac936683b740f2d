"""``qis-fhir synth``: write a synthetic FHIR bulk export with planted treatment effects."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qis_fhir.synth.effects import PROFILES


@click.command("synth")
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Number of patients.")
@click.option("--seed", type=int, required=True, help="Random seed: the same seed writes the same bytes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Export folder to write (<Type>.000.ndjson ...). Must not already hold NDJSON files "
                   "unless --overwrite.")
@click.option("--observations", type=click.IntRange(min=0), default=None,
              help="Pad with routine vital signs until about this many Observation lines exist "
                   "(benchmarks: 200,000 to 2,000,000).")
@click.option("--site-profile", type=click.Choice(sorted(PROFILES)), default="default", show_default=True,
              help="Population of the site: age mix, prevalence and prescribing habits.")
@click.option("--gzip", "gzip_output", is_flag=True, help="Write .ndjson.gz parts.")
@click.option("--max-lines", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Start a new part file (.001, .002, ...) after this many lines.")
@click.option("--truth", "truth_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the planted-effects answer key [default: OUT.truth.json beside OUT].")
@click.option("--start-years", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Calendar years over which treatment starts are spread (packets aggregate per "
                   "year: 1 keeps each planted cohort in one cell).")
@click.option("--rare-patients", type=click.IntRange(min=0), default=None,
              help="Size of the rare non-responder cohort [default: about 1 in 125 patients, by profile].")
@click.option("--no-encounters", is_flag=True, help="Do not write Encounter resources.")
@click.option("--overwrite", is_flag=True, help="Delete NDJSON files already in OUT first.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: only when stderr is a terminal].")
def synth(patients: int, seed: int, out_dir: Path, observations: int | None, site_profile: str,
          gzip_output: bool, max_lines: int, truth_path: Path | None, start_years: int,
          rare_patients: int | None, no_encounters: bool, overwrite: bool, progress: bool | None) -> None:
    """Write a synthetic FHIR R4 bulk export with planted treatment effects.

    The export looks like a server's $export (Patient, Condition, MedicationRequest, Observation,
    Encounter as <Type>.000.ndjson), with the codes the Synthea fixtures use. The answer key of planted
    effects per cohort (bucket x treatment x age band x sex), including a rare cohort where
    hydrochlorothiazide fails, goes to OUT.truth.json, outside the export folder.
    """
    from qis_fhir.synth.generator import generate_export

    if progress is None:
        progress = sys.stderr.isatty()
    result = generate_export(
        out_dir, patients=patients, seed=seed, observations=observations, site_profile=site_profile,
        progress=progress, truth_path=truth_path, max_lines_per_file=max_lines, gzip=gzip_output,
        encounters=not no_encounters, overwrite=overwrite, start_years=start_years,
        rare_patients=rare_patients,
    )
    counts = ", ".join(f"{k} {v:,}" for k, v in result.counts.items())
    lines = sum(result.counts.values())
    click.echo(f"wrote {result.out_dir}: {counts} ({len(result.files)} files, {lines:,} lines "
               f"in {result.seconds:.1f} s)")
    click.echo(f"planted effects: {result.truth_path}")
