"""Extraction of one nightly FHIR bulk export into typed, pseudonymous Parquet tables."""


from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.assets.metadata import asset_info, column_schema
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.fhir.schema import TABLES

COUNTS_CHECK = "every_line_accounted_for"


@asset(
    partitions_def=daily_exports,
    group_name="extract",
    kinds={"parquet"},
    **asset_info("extract", phi=True, uses_mapping=True),  # the mapping's quality suites check it
    # one asset, five tables: a column schema per table (``dagster/column_schema`` holds one)
    metadata={f"column_schema/{t}": column_schema(TABLES[t]) for t in TABLE_NAMES},
    check_specs=[
        AssetCheckSpec(
            COUNTS_CHECK,
            asset="fhir_extract",
            blocking=True,
            partitions_def=daily_exports,
            description="per type and file: read = accepted + quarantined (+ skipped)",
        ),
    ],
    description=(
        "The partition's export folder read into extract/<table>.parquet with every rejected line in "
        "quarantine.ndjson (file, line, reason; never its content). Patient ids are keyed hashes."
    ),
)
def fhir_extract(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
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

    return MaterializeResult(
        metadata={
            "dagster/row_count": sum(summary.rows.values()),
            **{f"rows_{table}": n for table, n in summary.rows.items()},
            **summary.totals,  # read, accepted, quarantined, skipped
            "quarantine_reasons": MetadataValue.json(summary.quarantine_reasons),
            "validate": summary.validate,
            "validated": summary.validated,
            "seconds": round(summary.seconds, 2),
            "summary": MetadataValue.path(str(out_dir / EXTRACT_DIR / SUMMARY_FILE)),
            "quality_report": MetadataValue.path(str(quality_report_path(out_dir, "extract"))),
        },
        check_results=[
            # extract_export checks these counts itself (summary.check_invariants) and raises before it
            # returns when they do not add up, failing this step: reaching here means they do.
            AssetCheckResult(check_name=COUNTS_CHECK, passed=True),
        ],
    )
