"""Quality suites as blocking, per-partition asset checks that can also run on their own.

One ``@asset_check`` per checked table, partitioned like its asset (``partitions_def=daily_exports``;
Dagster takes the partition from the run, so a check reads one partition's folder, never all of
them). The asset runs the suites (``qis_fhir.stages.quality_step``, which writes
``quality/<part>.json`` pass or fail); the check reads that report for its table. So a check in the
asset's run costs a file read (measured 7-10 ms a check step on synthea-r4-105, whose extract step
with its suites takes 3.3 s), and the same check launched alone for one partition (the UI's
"Execute", or a job selecting ``AssetSelection.checks(...)`` run with the ``dagster/partition`` tag) reports the partition's
last materialisation without re-running great-expectations. ``blocking=True``: a failed suite stops
every downstream asset of the run, as ``QualityReport.raise_for_failure`` stops ``qis-fhir run``; the
library's ``require_quality`` refuses to build on a failed report either way.
"""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from pipelines.assets.extract import table_asset
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES


def check_name(table: str) -> str:
    return f"{table}_quality"


def quality_check(asset: str, part: str, table: str) -> AssetChecksDefinition:
    """The blocking check of ``table``'s suite on ``asset``, read from the partition's ``part`` report."""

    @asset_check(
        name=check_name(table),
        asset=asset,
        additional_deps=["mapping_set"],  # the suites are the mapping's: lineage shows that
        blocking=True,
        partitions_def=daily_exports,
        description=f"great-expectations suite for table {table} (mappings/<version>/quality.yaml), "
        f"as recorded in the partition's quality/{part}.json",
    )
    def _check(context: AssetCheckExecutionContext, site: SiteConfig) -> AssetCheckResult:
        from qis_fhir.quality.report import format_expectation
        from qis_fhir.stages import read_quality_suite

        report, suite = read_quality_suite(site.out_path(context.partition_key), part, table)
        failures = [r for r in suite["results"] if not r["success"] and not r["warning"]]
        return AssetCheckResult(
            passed=suite["success"],
            severity=AssetCheckSeverity.ERROR,
            metadata={
                "rows": suite["rows"],
                "expectations": suite["expectations"],
                "failed": suite["failed"],
                "warnings": suite["warnings"],
                "mapping_version": report["mapping_version"],
                "suites_sha256": report["suites_sha256"],
                "failures": MetadataValue.md("\n".join(f"- {format_expectation(r)}" for r in failures) or "none"),
            },
        )

    return _check


#: every quality check: each extract table's on its own asset (``fhir_<table>``), the events' on ``outcome_events``
QUALITY_CHECKS = [
    *(quality_check(table_asset(t), "extract", t) for t in TABLE_NAMES),
    quality_check("outcome_events", "outcome_events", "outcome_events"),
]
