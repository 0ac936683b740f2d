"""``qis-fhir mapping check [DIR]``: validate a mapping set before a run uses it."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def mapping() -> None:
    """Mapping sets: condition buckets, treatment codes, outcome measures, cohorts (docs/mappings.md)."""


@mapping.command("check")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
def check(directory: Path | None) -> None:
    """Validate the mapping set in DIRECTORY (default: mappings/v2 of this checkout), quality.yaml too.

    Prints its version, content hash and what it covers; on a problem prints every error as
    file:line and exits with code 4 (MAPPING_INVALID).
    """
    from qis_fhir.mapping import load_mapping
    from qis_fhir.quality.suites import load_suites
    from qis_fhir.quality.vocabulary import VOCABULARY

    m = load_mapping(directory)
    suites = load_suites(m)  # a bad quality.yaml would otherwise surface only after a night's extraction
    click.echo(f"{m.version} {m.content_hash}")
    click.echo(
        f"{len(m.buckets)} buckets, {len(m.treatments)} treatments, {len(m.measures)} measures, "
        f"{len(m.cohorts.age_bands)} age bands, period {m.cohorts.period}"
    )
    for b in m.buckets.values():
        txs = sorted(t.id for t in m.treatments.values() if b.id in t.buckets)
        click.echo(f"  {b.id}: measures {', '.join(b.measures)}; treatments {', '.join(txs) or '-'}")
    rules = [r for table_rules in suites.tables.values() for r in table_rules]
    tolerant = sum(1 for r in rules if VOCABULARY[r.name].tolerant)
    click.echo(
        f"{suites.path.name}: {len(rules)} rules on {len(suites.tables)} tables, "
        f"{tolerant} plausibility ranges that warn within their mostly, {len(rules) - tolerant} that block"
    )
