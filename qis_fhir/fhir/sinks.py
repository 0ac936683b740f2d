"""Where extracted rows and rejected lines go: Parquet tables written in chunks, and the quarantine.

Rows arrive as tuples and are buffered per table; every ``chunk_rows`` rows the buffer is turned
column-wise into Arrow arrays once and written as a row group, so memory stays flat however large
the export. Files are written under temporary names and moved into place only when the extraction
finishes, so a crashed run never leaves a half table that looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_CHUNK_ROWS = 8_192  # rows converted to Arrow at a time: small enough to still be in the CPU cache
ROW_GROUP_ROWS = 131_072  # rows per Parquet row group
SOURCE_FILE = "source_file"  # a table with this column gets it from the file being read, not from the rows


class TableSink:
    """One extract table: row tuples in, Parquet out.

    A table with a ``source_file`` column (observations) takes it from ``begin_file``, not from each
    row: its rows leave that column out, and the buffer is converted whenever the file changes, so
    one batch has one file and the column is that label repeated. Carrying the same string in every
    row cost ~4 % of a parse per row (docs/extract.md).
    """

    def __init__(self, name: str, schema: pa.Schema, path: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.name = name
        self.schema = schema
        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.partial")
        self.chunk_rows = chunk_rows
        self.rows: list[tuple] = []
        self._source_at = schema.get_field_index(SOURCE_FILE)  # -1: no such column
        row_fields = [f for f in schema if f.name != SOURCE_FILE]
        self._struct = pa.struct(row_fields)
        self._source: str | None = None
        self._batches: list[pa.RecordBatch] = []
        self._batched_rows = 0
        self.count = 0
        # dictionary-encode only the columns that repeat (codes, units, patient keys, source files): a
        # dictionary over unique resource keys or line numbers costs time and saves nothing
        unique = ("_key", "keys", "codes", "_line")
        repeating = [f.name for f in schema if not f.name.endswith(unique) or f.name == "patient_key"]
        self._writer = pq.ParquetWriter(self.tmp_path, schema, compression="zstd", use_dictionary=repeating)

    def begin_file(self, label: str) -> None:
        """Rows added from now on come from ``label`` (for the ``source_file`` column)."""
        if self._source_at >= 0 and label != self._source:
            self._convert()
            self._source = label

    def add(self, rows: list[tuple]) -> None:
        buf = self.rows
        buf.extend(rows)
        if len(buf) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Convert the buffered rows to Arrow (while they are still in the CPU cache); write a row
        group when enough have gathered."""
        self._convert()
        if self._batched_rows >= ROW_GROUP_ROWS:
            self._write()

    def append(self, batch: pa.RecordBatch) -> None:
        """Rows already in Arrow (another extraction's table, ``parallel.py``), after those added so far."""
        self._convert()
        self._batches.append(batch.cast(self.schema))
        self._batched_rows += batch.num_rows
        self.count += batch.num_rows
        if self._batched_rows >= ROW_GROUP_ROWS:
            self._write()

    def _convert(self) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        # one C pass over the row tuples (a struct array), not one Python pass per column
        batch = pa.RecordBatch.from_struct_array(pa.array(self.rows, type=self._struct))
        if self._source_at >= 0:
            columns = batch.columns
            columns.insert(self._source_at, pa.repeat(self._source, n))
            batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        self._batches.append(batch)
        self._batched_rows += n
        self.count += n
        self.rows = []

    def _write(self) -> None:
        if self._batches:
            table = pa.Table.from_batches(self._batches, schema=self.schema)
            self._writer.write_table(table, row_group_size=max(self._batched_rows, 1))
            self._batches = []
            self._batched_rows = 0

    def commit(self) -> None:
        self.flush()
        self._write()
        self._writer.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


class QuarantineSink:
    """``quarantine.ndjson``: one JSON object per rejected line; details come from our code only.

    At most ``max_lines`` records are written per file and reason: a file of five million blank
    lines (a 4.9 KB gzip) wrote a 714 MB quarantine before. The lines beyond are counted in
    ``not_written`` (per file label, per reason) and quarantined all the same. One record may stand
    for several lines (``"lines": n``: the Bundle entries beyond the entry cap); ``written`` counts
    the lines the records stand for.
    """

    def __init__(self, path: Path, max_lines: int) -> None:
        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.partial")
        self.max_lines = max_lines
        self._fh = open(self.tmp_path, "wb", buffering=1 << 16)
        self._written: dict[tuple[str, str], int] = {}
        self.not_written: dict[str, dict[str, int]] = {}
        self.written = 0

    def add(self, file: str, line: int, resource_type: str, reason: str, detail: str, lines: int = 1) -> None:
        """Quarantine ``lines`` lines from ``line`` on for one reason: one record stands for them."""
        written = self._written.get((file, reason), 0)
        if written < self.max_lines:
            record = {"file": file, "line": line, "resource_type": resource_type, "reason": reason, "detail": detail}
            if lines > 1:
                record["lines"] = lines
            self._fh.write(orjson.dumps(record) + b"\n")
            self._written[file, reason] = written + 1
            self.written += lines
            return
        counts = self.not_written.setdefault(file, {})
        counts[reason] = counts.get(reason, 0) + lines

    def commit(self) -> None:
        self._fh.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)
