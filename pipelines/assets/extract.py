"""Extraction of one nightly FHIR bulk export into typed, pseudonymous Parquet tables.

One step (``qis_fhir.stages.extract_step`` reads the export once, every resource type in one pass),
five assets: a ``@multi_asset`` with an ``AssetSpec`` per table, so lineage shows each resource type
(``fhir_patients``, ``fhir_conditions``, ``fhir_medication_requests``, ``fhir_observations``,
``fhir_encounters``), each drawn from the export it was read from and the mapping set whose quality
suites check it, each with its own column schema, row count and read / accepted / quarantined lines.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from pipelines.assets.export import EXPORT
from pipelines.assets.metadata import OWNERS, code_version, column_schema, tags
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.fhir.schema import TABLE_OF_TYPE, TABLES

COUNTS_CHECK = "every_line_accounted_for"
#: table -> the FHIR resource type its rows come from
TYPE_OF_TABLE = {table: rtype for rtype, table in TABLE_OF_TYPE.items()}


def table_asset(table: str) -> str:
    """The asset key of one extract table: ``fhir_<table>``."""
    return f"fhir_{table}"


#: the asset keys of the extract tables, in TABLE_NAMES order
TABLE_ASSETS = [table_asset(t) for t in TABLE_NAMES]


def _spec(table: str) -> AssetSpec:
    return AssetSpec(
        table_asset(table),
        partitions_def=daily_exports,
        group_name="extract",
        kinds={"parquet"},
        owners=OWNERS,
        tags=tags("extract", phi=True),
        code_version=code_version(uses_mapping=True),  # the mapping's quality suites check it
        deps=[EXPORT, "mapping_set"],
        metadata={"dagster/column_schema": column_schema(TABLES[table]), "resource_type": TYPE_OF_TABLE[table]},
        description=(
            f"The partition's {TYPE_OF_TABLE[table]} resources as extract/{table}.parquet (every rejected line in "
            "quarantine.ndjson: file, line, reason, never its content). Patient ids are keyed hashes."
        ),
    )


@multi_asset(
    name="fhir_extract",
    specs=[_spec(t) for t in TABLE_NAMES],
    partitions_def=daily_exports,
    check_specs=[
        AssetCheckSpec(COUNTS_CHECK, asset=table_asset(t), blocking=True, partitions_def=daily_exports,
                       description=f"{TYPE_OF_TABLE[t]} lines: read = accepted + quarantined")
        for t in TABLE_NAMES
    ],
)
def fhir_extract(context: AssetExecutionContext, site: SiteConfig):
    from qis_fhir.fhir.extract import EXTRACT_DIR, SUMMARY_FILE
    from qis_fhir.runfolder import EXTRACT, start_run
    from qis_fhir.stages import extract_step, quality_report_path, quality_step

    out_dir = site.out_path(context.partition_key)
    setup = site.setup()  # before the long extraction: a bad mapping or key fails fast
    # a fresh run folder for the partition: the previous materialisation (its extract and everything
    # derived from it) stays readable until this one is complete, then is replaced whole
    with start_run(out_dir, command="dagster", planned=[EXTRACT]) as run:
        summary = extract_step(run, site.export_path(context.partition_key), setup, validate=site.validation, sample_rate=site.sample_rate)
        # its verdict is the checks' (pipelines/assets/checks.py), read back from quality/extract.json
        quality_step(run, setup.mapping, "extract")  # swapped in with the tables, pass or fail

    export_wide = {
        "export_totals": MetadataValue.json(summary.totals),  # read, accepted, quarantined, skipped: every type
        "quarantine_reasons": MetadataValue.json(summary.quarantine_reasons),
        "validate": summary.validate,
        "seconds": round(summary.seconds, 2),
        "summary": MetadataValue.path(str(out_dir / EXTRACT_DIR / SUMMARY_FILE)),
        "quality_report": MetadataValue.path(str(quality_report_path(out_dir, "extract"))),
    }
    for table in TABLE_NAMES:
        lines = summary.by_type.get(TYPE_OF_TABLE[table], {"read": 0, "accepted": 0, "quarantined": 0})
        key = table_asset(table)
        yield MaterializeResult(
            asset_key=key,
            metadata={
                "dagster/row_count": summary.rows.get(table, 0),
                "read": lines["read"],
                "accepted": lines["accepted"],
                "quarantined": lines["quarantined"],
                "file": MetadataValue.path(str(out_dir / EXTRACT_DIR / f"{table}.parquet")),
                **export_wide,
            },
            check_results=[
                # extract_export raises before it returns when a count does not add up (check_invariants);
                # this shows the type's own figures beside the verdict
                AssetCheckResult(check_name=COUNTS_CHECK, asset_key=key, passed=lines["read"] == lines["accepted"] + lines["quarantined"],
                                 metadata={k: lines[k] for k in ("read", "accepted", "quarantined")}),
            ],
        )
