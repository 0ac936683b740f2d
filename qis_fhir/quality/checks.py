"""The quality stage's entry points: check every table, or one, against the mapping's suites."""

from __future__ import annotations

import logging
import time
from pathlib import Path
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
    return _logged(SuiteResult(table=name, rows=len(df), results=tuple(results), seconds=time.perf_counter() - started))


def _logged(result: SuiteResult) -> SuiteResult:
    name = result.table
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
    return _report(results, unchecked, mapping, suites)


def _report(results: list[SuiteResult], unchecked: list[str], mapping: Any, suites: SuiteSet) -> QualityReport:
    if unchecked:
        log.warning("quality: no suite declared for %s", ", ".join(unchecked))
    return QualityReport(
        results=results,
        mapping_version=mapping.version,
        suites_file=str(suites.path.name),
        suites_sha256=suites.sha256,
        unchecked_tables=unchecked,
    )


def check_extract_tables(folder: Path | str, mapping: Any, *, suites: SuiteSet | None = None, batch_rows: int | None = None) -> QualityReport:
    """``check_tables`` of an extract folder's five tables, read ``batch_rows`` rows at a time
    (``qis_fhir.fhir.scan.table_batches``) and combined into the same report (``batches.py``), so the
    memory it takes is one batch's whatever the export's size."""
    from qis_fhir.fhir import TABLE_NAMES
    from qis_fhir.fhir.extract import require_extract
    from qis_fhir.fhir.scan import BATCH_ROWS, connect, table_batches, table_path
    from qis_fhir.quality.batches import CROSS_BATCH, combine, duplicate_rows
    from qis_fhir.quality.engine import run_rules

    suites = suites or load_suites(mapping)
    folder = Path(folder)
    require_extract(folder)
    results = []
    with connect(folder) as con:
        for name in (n for n in TABLE_NAMES if n in suites.tables):
            started = time.perf_counter()
            rules, fingerprint = suites.tables[name], suites.fingerprint(name)
            parts: list[list] = [[] for _ in rules]
            rows = 0
            for df in table_batches(folder, name, batch_rows or BATCH_ROWS):
                rows += len(df)
                for i, r in enumerate(run_rules(name, fingerprint, rules, df)):
                    parts[i].append(r)
            combined = tuple(combine(rule, part, duplicate_rows(con, table_path(folder, name), rule) if rule.name in CROSS_BATCH else None)
                             for rule, part in zip(rules, parts))
            results.append(_logged(SuiteResult(table=name, rows=rows, results=combined, seconds=time.perf_counter() - started)))
    unchecked = sorted(name for name in TABLE_NAMES if name not in suites.tables)
    return _report(results, unchecked, mapping, suites)
