"""Extraction of one nightly FHIR bulk export into typed, pseudonymous Parquet tables."""


from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.assets.checks import quality_check_results, quality_check_specs
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
    from qis_fhir.fhir.extract import EXTRACT_DIR, SUMMARY_FILE
    from qis_fhir.quality import check_tables

    out_dir = site.out_path(context.partition_key)
    mapping = site.load_mapping()  # before the long extraction: a bad mapping fails fast
    summary = extract_export(
        site.export_path(context.partition_key),
        out_dir,
        secret=site.secret(),
        validate=site.validation,
        sample_rate=site.sample_rate,
    )
    report = check_tables(load_extract(out_dir), mapping)
    report.write(out_dir / "quality" / "extract.json")

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
