"""Extraction of one nightly FHIR bulk export into typed, pseudonymous Parquet tables."""


from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.assets.checks import quality_check_results, quality_check_specs, quality_report_path
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES

COUNTS_CHECK = "every_line_accounted_for"


@asset(
    partitions_def=daily_exports,
    group_name="extract",
    kinds={"parquet"},
    check_specs=[
        AssetCheckSpec(
            COUNTS_CHECK,
            asset="fhir_extract",
            blocking=True,
            description="per type and file: read = accepted + quarantined (+ skipped)",
        ),
        *quality_check_specs("fhir_extract", TABLE_NAMES),
    ],
    description=(
        "The partition's export folder read into extract/<table>.parquet with every rejected line in "
        "quarantine.ndjson (file, line, reason; never its content). Patient ids are keyed hashes."
    ),
)
def fhir_extract(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.fhir.extract import EXTRACT_DIR, QUARANTINE_FILE, SUMMARY_FILE
    from qis_fhir.quality import check_tables
    from qis_fhir.runfolder import EXTRACT, start_run

    out_dir = site.out_path(context.partition_key)
    mapping = site.load_mapping()  # before the long extraction: a bad mapping fails fast
    secret = site.secret()
    # a fresh run folder for the partition: the previous materialisation (its extract and everything
    # derived from it) stays readable until this one is complete, then is replaced whole
    with start_run(out_dir, command="dagster", planned=[EXTRACT]) as run:
        summary = extract_export(
            site.export_path(context.partition_key),
            run.path,
            secret=secret,
            validate=site.validation,
            sample_rate=site.sample_rate,
        )
        summary.raise_if_nothing_extracted(run.path / QUARANTINE_FILE)
        run.mark(EXTRACT, summary.totals)
        report = check_tables(load_extract(run.path), mapping)
        report.write(quality_report_path(run.path, "extract"))  # swapped in with the tables, pass or fail

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
        },
        check_results=[
            # extract_export checks these counts itself (summary.check_invariants) and raises before it
            # returns when they do not add up, failing this step: reaching here means they do.
            AssetCheckResult(check_name=COUNTS_CHECK, passed=True),
            *quality_check_results(report),
        ],
    )
