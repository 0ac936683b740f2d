"""The quality stage's entry points: check every table, or one, against the mapping's suites."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from qis_fhir.errors import MappingError
from qis_fhir.quality.report import QualityReport, SuiteResult
from qis_fhir.quality.suites import SuiteSet, load_suites

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def _run_suite(suites: SuiteSet, name: str, df: pd.DataFrame) -> SuiteResult:
    from qis_fhir.quality.engine import run_rules

    started = time.perf_counter()
    results = run_rules(name, suites.fingerprint(name), suites.tables[name], df)
    result = SuiteResult(table=name, rows=len(df), results=tuple(results), seconds=time.perf_counter() - started)
    log.info(
        "quality: %s %s (%d rows, %d of %d expectations failed, %d warnings, %.2fs)",
        name,
        "passed" if result.success else "FAILED",
        result.rows,
        len(result.failures),
        len(result.results),
        len(result.warnings),
        result.seconds,
    )
    for warning in result.warnings:  # passed within mostly: counts and the rule only, never a value
        log.warning("quality: table %s: %s", name, warning.format())
    return result


def check_table(name: str, df: pd.DataFrame, mapping: Any, *, suites: SuiteSet | None = None) -> SuiteResult:
    """Validate one table with its suite from ``<mapping dir>/quality.yaml``.

    Raises ``MappingError`` when the suites file is invalid or declares no suite for ``name``.
    """
    suites = suites or load_suites(mapping)
    if name not in suites.tables:
        raise MappingError(f"{suites.path.name}: no suite declared for table {name!r}")
    return _run_suite(suites, name, df)


def check_tables(tables: dict[str, pd.DataFrame], mapping: Any, *, suites: SuiteSet | None = None) -> QualityReport:
    """Validate every table that has a suite; tables without one are listed as unchecked.

    The report never raises by itself: call ``raise_for_failure()`` to stop on failure.
    """
    suites = suites or load_suites(mapping)
    results = [_run_suite(suites, name, df) for name, df in tables.items() if name in suites.tables]
    unchecked = sorted(name for name in tables if name not in suites.tables)
    if unchecked:
        log.warning("quality: no suite declared for %s", ", ".join(unchecked))
    return QualityReport(
        results=results,
        mapping_version=mapping.version,
        suites_file=str(suites.path.name),
        suites_sha256=suites.sha256,
        unchecked_tables=unchecked,
    )
