"""Quality suites as blocking asset checks: one check per table, declared on the asset that makes it.

The checks are ``check_specs`` on the asset and their results travel in the asset's
``MaterializeResult`` (measured: a separate unpartitioned ``@asset_check`` on a partitioned
asset would load every partition). ``blocking=True`` means a failed suite stops every downstream
asset of the run, just as ``QualityReport.raise_for_failure`` stops ``qis-fhir run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

if TYPE_CHECKING:
    from qis_fhir.quality import QualityReport


def check_name(table: str) -> str:
    return f"{table}_quality"


def quality_check_specs(asset: str, tables: tuple[str, ...]) -> list[AssetCheckSpec]:
    """Blocking checks on ``asset``; they read the suites of ``mapping_set`` (lineage shows that)."""
    return [
        AssetCheckSpec(
            check_name(t),
            asset=asset,
            additional_deps=["mapping_set"],
            blocking=True,
            description=f"great-expectations suite for table {t} (mappings/<version>/quality.yaml)",
        )
        for t in tables
    ]


def quality_check_results(report: QualityReport) -> list[AssetCheckResult]:
    """One result per checked table: pass/fail, counts, and the readable failure lines (no cell values)."""
    results = []
    for suite in report.results:
        results.append(
            AssetCheckResult(
                check_name=check_name(suite.table),
                passed=suite.success,
                severity=AssetCheckSeverity.ERROR,
                description=suite.format(),
                metadata={
                    "rows": suite.rows,
                    "expectations": len(suite.results),
                    "failed": len(suite.failures),
                    "mapping_version": report.mapping_version,
                    "suites_sha256": report.suites_sha256,
                    "failures": MetadataValue.md("\n".join(f"- {f.format()}" for f in suite.failures) or "none"),
                },
            )
        )
    return results

