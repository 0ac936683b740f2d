"""Suites over Parquet tables, batch by batch, in worker processes that great-expectations never outlives.

Why workers, measured on synthetic exports (``qis-fhir bench --only run``): validating the extract
batch after batch in the process that runs the pipeline grew it by ~1.2 MB a batch (batches of
131,072 observations; 550 MiB at 2 million Observations, 1,026 MiB at 20 million). The growth is state
great-expectations keeps across validations: clearing its validation-results store did not change
it, nor did ``malloc_trim``, and the batches themselves are released. The suites were also a third to
a half of the run's CPU, on one core. So each task (one row group of one table, validated in batches
of ``batch_rows``) runs in a worker process that serves at most ``TASKS_PER_WORKER`` tasks, and
``workers`` of them run at once; the results are combined in table order (``batches.combine``), so the
report is the one a single pass over the whole table gives.

The workers are forked from the stages' fork server (``qis_fhir.forkserver``), which imported
great-expectations before it forked them: no worker pays the import, and the process that runs the
pipeline never imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qis_fhir.errors import QualityError
from qis_fhir.quality.report import ExpectationResult
from qis_fhir.quality.suites import Rule

if TYPE_CHECKING:
    import pyarrow as pa

#: tasks (row groups) a worker validates before it is replaced: its growth stays under ~20 MB, and a
#: new worker costs ~0.15 s (its context and suites) against ~0.45 s of validation per task
TASKS_PER_WORKER = 16


@dataclass(frozen=True)
class BatchTask:
    """One row group of one table (``row_group`` None: a table without rows), validated in batches."""

    table: str
    path: Path
    row_group: int | None
    batch_rows: int
    fingerprint: str
    rules: tuple[Rule, ...]
    schema: pa.Schema | None = None  # cast to it (the extract tables' types), else the file's own


def validate_batches(task: BatchTask) -> tuple[int, list[list[ExpectationResult]], float]:
    """The task's rows, each batch's results (one per rule, in rule order) and the seconds it took."""
    import pyarrow as pa

    from qis_fhir.fhir.scan import parquet_batches
    from qis_fhir.quality.engine import run_rules

    started = time.perf_counter()
    rows, per_batch = 0, []
    groups = None if task.row_group is None else [task.row_group]
    try:
        for df in parquet_batches(task.path, task.batch_rows, row_groups=groups, schema=task.schema):
            rows += len(df)
            per_batch.append(run_rules(task.table, task.fingerprint, task.rules, df))
    except pa.ArrowException as e:
        raise unreadable(task.table, task.path, e) from None
    return rows, per_batch, time.perf_counter() - started


def unreadable(table: str, path: Path, error: Exception) -> QualityError:
    """The error of a table file that cannot be read (damaged, truncated, not Parquet, a value that does
    not fit its column's type). Arrow's own message is left out: a cast error quotes the value."""
    return QualityError(f"the {table} table's file {path.name} cannot be read ({type(error).__name__}): it is damaged or was "
                        "not written by this version; run the stage that writes it again")


def tasks_of(table: str, path: Path, batch_rows: int, fingerprint: str, rules: tuple[Rule, ...],
             schema: pa.Schema | None = None) -> list[BatchTask]:
    """One task per row group of the table at ``path`` (one task when it has none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as f:
            groups = list(range(f.num_row_groups)) or [None]
    except pa.ArrowException as e:
        raise unreadable(table, path, e) from None
    return [BatchTask(table, path, g, batch_rows, fingerprint, rules, schema) for g in groups]


def validate_all(tasks: list[BatchTask], workers: int) -> list[tuple[int, list[list[ExpectationResult]], float]]:
    """``validate_batches`` of every task, in order, over ``workers`` processes forked from the stages'
    fork server (``forkserver.QUALITY`` imported once), each serving at most ``TASKS_PER_WORKER`` tasks
    (``forkserver.in_rounds``). A worker that dies (out of memory) fails the stage with
    ``BrokenProcessPool`` rather than hanging."""
    from qis_fhir.forkserver import QUALITY, held, in_rounds

    with held(*QUALITY):
        return in_rounds(validate_batches, tasks, workers, TASKS_PER_WORKER)
