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


def check_extract_tables(folder: Path | str, mapping: Any, *, suites: SuiteSet | None = None, batch_rows: int | None = None,
                         workers: int = 1) -> QualityReport:
    """``check_tables`` of an extract folder's five tables, read from their Parquet files in batches
    (``check_parquet_tables``): the memory it takes is a batch's per worker, whatever the export's size."""
    from qis_fhir.fhir import TABLE_NAMES
    from qis_fhir.fhir.extract import require_extract
    from qis_fhir.fhir.scan import table_path
    from qis_fhir.fhir.schema import TABLES

    require_extract(folder)
    return check_parquet_tables({name: table_path(folder, name) for name in TABLE_NAMES}, mapping, suites=suites,
                                batch_rows=batch_rows, workers=workers, schemas=TABLES)


def check_parquet_tables(paths: dict[str, Path], mapping: Any, *, suites: SuiteSet | None = None, batch_rows: int | None = None,
                         workers: int = 1, schemas: dict[str, Any] | None = None) -> QualityReport:
    """``check_tables`` of the Parquet tables at ``paths`` (cast to ``schemas[name]`` where given), each
    row group validated in batches of ``batch_rows`` rows (default: ``scan.batch_rows_of``) over ``workers`` processes (``workers.py``)
    and the batches' results combined into the report one pass over the whole table gives
    (``batches.py``: rules that span batches, uniqueness, are counted over the whole file by DuckDB)."""
    from qis_fhir.fhir.scan import batch_rows_of
    from qis_fhir.memory import in_child
    from qis_fhir.quality.batches import CROSS_BATCH, combine, count_duplicates
    from qis_fhir.quality.workers import tasks_of, validate_all

    suites = suites or load_suites(mapping)
    checked = [name for name in paths if name in suites.tables]
    tasks = {name: tasks_of(name, Path(paths[name]), batch_rows or batch_rows_of(name), suites.fingerprint(name), suites.tables[name],
                            (schemas or {}).get(name)) for name in checked}
    done = iter(validate_all([t for name in checked for t in tasks[name]], workers))
    outputs = {name: [next(done) for _ in tasks[name]] for name in checked}
    spanning = [(name, i) for name in checked for i, rule in enumerate(suites.tables[name]) if rule.name in CROSS_BATCH]
    # in a child: DuckDB's allocator keeps what the aggregate used (batches.count_duplicates)
    counted = in_child(count_duplicates, [(Path(paths[name]), suites.tables[name][i]) for name, i in spanning]) if spanning else []
    duplicates = dict(zip(spanning, counted, strict=True))
    results = []
    for name in checked:
        rules = suites.tables[name]
        per_batch = [batch for _, batches, _ in outputs[name] for batch in batches]
        combined = tuple(combine(rule, [batch[i] for batch in per_batch], duplicates.get((name, i))) for i, rule in enumerate(rules))
        rows, seconds = sum(o[0] for o in outputs[name]), sum(o[2] for o in outputs[name])
        results.append(_logged(SuiteResult(table=name, rows=rows, results=combined, seconds=seconds)))
    unchecked = sorted(name for name in paths if name not in suites.tables)
    return _report(results, unchecked, mapping, suites)
