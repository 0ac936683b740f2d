"""Reading the extract tables back without holding them whole: batches, pushdown, patient shards.

The stages after extraction used to load all five tables into pandas at once: on a synthetic export
of 2 million Observations (20,000 patients) the run peaked at 1.5 GiB against the extraction's
0.24 GiB, and it grew with the export. They now read only what they need:

* **Batches** (``parquet_batches``): the quality suites see a table ``batch_rows`` rows at a
  time, as the DataFrames ``load_extract`` would have given, so memory is one batch whatever the size.
* **Pushdown and shards** (``connect``): DuckDB scans the Parquet files with the filter and the
  columns pushed into the scan, under a memory limit (it spills to the run folder beyond it). Patients
  are split into ``shards`` by the first hex digits of their key (an HMAC, so evenly spread).

Why DuckDB (measured on the 2-million-Observation extract, the 115,541 rows of the three mapped LOINC
codes with the eight columns the outcome stage reads; peak RSS of a fresh process, 112 MiB after
imports): DuckDB 210 MiB, 0.25 s CPU; ``pyarrow.dataset.to_table(filter=...)`` 422 MiB, 1.2 s CPU;
pyarrow batches filtered one by one 323 MiB, 0.7 s CPU. Polars is not installed, and DuckDB already
is (through dagster-duckdb).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa

#: rows of one table the quality suites see at a time: great-expectations over a batch of observations
#: this size holds ~120 MiB beyond its own import (~200 MiB), flat over the batches (2 million rows)
BATCH_ROWS = 131_072
#: tables whose rows cost more in pandas: a medication request's two list columns become a NumPy
#: array per cell, so a batch of 131,072 requests took 340 MiB in a quality worker against ~100 MiB
#: for as many observations (peak RSS over the worker's imports, a 5-million-Observation extract);
#: 32,768 took 166 MiB, 16,384 took 116 MiB in the same CPU time. The outcome tables grow with the
#: patients, and their rows are wide: 131,072 control units took 218 MiB, 16,384 took 62 MiB (70,130
#: outcome events in one batch: 90 MiB, in batches of 16,384: 52 MiB), for ~1 s more CPU per 100,000 rows
BATCH_ROWS_OF = {"medication_requests": 16_384, "outcome_events": 16_384, "control_units": 16_384}
#: DuckDB's memory limit (it spills to disk beyond it) and threads: the parallelism is processes'
MEMORY_LIMIT = "256MB"
THREADS = 1
#: the shard of a patient key comes from its first four hex digits (65,536 values, evenly spread)
SHARD_DIGITS = 4


def table_path(folder: Path | str, table: str) -> Path:
    from qis_fhir.fhir.extract import EXTRACT_DIR

    return Path(folder) / EXTRACT_DIR / f"{table}.parquet"


def batch_rows_of(table: str) -> int:
    """The rows of ``table`` the quality suites see at a time."""
    return BATCH_ROWS_OF.get(table, BATCH_ROWS)


def parquet_batches(path: Path | str, batch_rows: int = BATCH_ROWS, *, row_groups: list[int] | None = None,
                    schema: pa.Schema | None = None) -> Iterator[pd.DataFrame]:
    """The Parquet file at ``path`` (only ``row_groups``, if given) as DataFrames of at most
    ``batch_rows`` rows, cast to ``schema`` if given (else typed as ``pandas.read_parquet`` types the
    file); no rows give one empty DataFrame, with the file's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        target = schema or f.schema_arrow
        empty = True
        for batch in f.iter_batches(batch_size=batch_rows, row_groups=row_groups):
            empty = False
            yield pa.Table.from_batches([batch]).cast(target).to_pandas()
        if empty:
            yield target.empty_table().to_pandas()


@contextlib.contextmanager
def connect(spill_parent: Path | str, memory_limit: str = MEMORY_LIMIT, threads: int = THREADS) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with the memory policy above (or a lower ``memory_limit``, more ``threads``),
    spilling into a temporary folder under ``spill_parent`` (the run folder: on the disk that holds
    the run) that is removed after."""
    import duckdb

    spill = Path(tempfile.mkdtemp(prefix=".duckdb-", dir=spill_parent))
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads, "temp_directory": str(spill),
                                 "preserve_insertion_order": False})
    try:
        con.execute("SET enable_progress_bar = false")  # else a pass over 2 s draws a bar on stderr, into the run's log
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def shard_sql(column: str, shards: int) -> str:
    """SQL for the shard (0 .. shards - 1) of a hex patient key column: its first ``SHARD_DIGITS`` hex
    digits scaled to ``shards``."""
    span = 16 ** SHARD_DIGITS
    return f"(CAST(('0x' || substr({column}, 1, {SHARD_DIGITS})) AS INTEGER) * {int(shards)} // {span})"

