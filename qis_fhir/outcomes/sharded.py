"""The outcome stage over an extract folder, patient shard by patient shard, never the whole extract.

``derive_outcome_events`` takes DataFrames; this module decides what reaches it. One DuckDB pass
per table (``fhir/scan.py``: pushdown, a memory limit, spilling) writes the rows the derivation reads
into a temporary folder partitioned by patient shard, then each shard's tables are derived alone and
the results combined. Events and control units are per patient, so the shards' outputs concatenated
and sorted as ``derive_outcome_events`` sorts them are the whole run's; every summary count is a
count of patients, episodes, requests or readings, so the shards' counts add up to the whole run's.

What is pushed down (equal to the whole tables for the derivation, tested on the fixtures and a
synthetic export under mapping v1 and v2, tests/scale/):

* Observations: only the rows of the mapped LOINC codes (measures and control readings: 5.8 % of the
  2 million rows of the synthetic benchmark export) plus each patient's earliest and latest row (the
  new-user washout reads where a patient's history begins, the control measures where the data end),
  without ``source_file`` / ``source_line``.
* The other four tables whole, split by shard.
* Two figures span shards: where the data end (``events.data_ends``), taken as the maximum over the
  shards in a first pass and given to each shard in the second.

Rows keep the extract's file order within a shard (DuckDB's ``file_row_number``), so ties (two
readings at one instant) resolve as over the whole table.

A reason reference (``reasonReference``) to a Condition of *another* patient resolves only when both
patients fall in one shard; no export in the tests holds one (a request's reason is its own
patient's condition).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.fhir.scan import connect, shard_sql, table_path
from qis_fhir.fhir.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd

    from qis_fhir.mapping import MappingSet
    from qis_fhir.outcomes.events import OutcomeResult

#: staged rows (all five tables) per shard: ~0.1 GiB of pandas in the derivation at 2 million
#: Observations (docs/benchmarks.md)
SHARD_ROWS = 500_000
#: DuckDB's memory limit for the staging pass, below the scans' (``scan.MEMORY_LIMIT``): the pass
#: writes every shard's partition at once, and at 256 MB it took 329 MiB over its imports on a
#: 20-million-Observation extract (10 shards), at 128 MB 203 MiB, at 64 MB 145 MiB, against 43 MiB
#: at 2 million (one shard); 64 MB costs 4 s more CPU there (26 s against 22 s), spilling to disk
STAGE_MEMORY_LIMIT = "64MB"
#: observation columns the derivation reads (all but the provenance)
OBS_COLUMNS = [c for c in TABLES["observations"].names if c not in ("source_file", "source_line")]
#: summary figures that are not counts: the same in every shard, never added
NOT_COUNTS = frozenset({"complete_years_through"})
_ROW = "_row"  # the row's place in the extract file


def mapped_codes(mapping: MappingSet) -> list[str]:
    """The LOINC codes whose readings the mapping's measures and control measures use."""
    codes = {m.loinc for m in mapping.measures.values()}
    codes |= {r.loinc for m in mapping.control_measures.values() for r in m.readings}
    return sorted(codes)


def _literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def stage_shards(folder: Path, staged: Path, shards: int, mapping: MappingSet) -> None:
    """Write the pushed-down rows of each table of the extract in ``folder`` into
    ``staged/<table>/shard=<n>/`` (one DuckDB pass per table, bounded memory)."""
    with connect(folder, memory_limit=STAGE_MEMORY_LIMIT) as con:
        _stage(con, folder, staged, shards, mapped_codes(mapping))


def _stage(con: Any, folder: Path, staged: Path, shards: int, codes: list[str]) -> None:
    for table in TABLE_NAMES:
        src = f"read_parquet({_literal(table_path(folder, table))}, file_row_number = true)"
        shard = shard_sql("patient_key", shards)
        if table == "observations":
            cols = ", ".join(f"o.{c}" for c in OBS_COLUMNS)
            query = (f"WITH o AS (SELECT * FROM {src}), "
                     "span AS (SELECT patient_key, min(effective) AS lo, max(effective) AS hi FROM o GROUP BY patient_key) "
                     f"SELECT {cols}, o.file_row_number AS {_ROW}, {shard.replace('patient_key', 'o.patient_key')} AS shard "
                     "FROM o JOIN span ON o.patient_key = span.patient_key "
                     f"WHERE o.code IN ({', '.join(map(_literal, codes))}) OR o.effective = span.lo OR o.effective = span.hi")
        else:
            query = f"SELECT * EXCLUDE (file_row_number), file_row_number AS {_ROW}, {shard} AS shard FROM {src}"
        con.execute(f"COPY ({query}) TO {_literal(staged / table)} (FORMAT parquet, PARTITION_BY (shard))")


def _shard_tables(staged: Path, shard: int) -> dict[str, pd.DataFrame]:
    """One shard's staged tables as ``load_extract`` types them, in extract file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for table in TABLE_NAMES:
        schema = TABLES[table]
        if table == "observations":
            schema = pa.schema([schema.field(c) for c in OBS_COLUMNS])
        files = sorted((staged / table / f"shard={shard}").glob("*.parquet"))
        if files:
            t = pa.concat_tables([pq.read_table(f) for f in files])
            t = t.take(pa.compute.sort_indices(t[_ROW])).select(schema.names).cast(schema)
        else:
            t = schema.empty_table()
        out[table] = t.to_pandas()
    return out


def shard_ends(staged: Path, shard: int, mapping: MappingSet) -> dict[str, float]:
    """``data_ends`` of one staged shard (the first pass; the whole data's are the maximum of these)."""
    from qis_fhir.outcomes.events import data_ends

    return data_ends(_shard_tables(staged, shard), mapping)


def derive_shard(staged: Path, shard: int, mapping: MappingSet, ends: dict[str, float]) -> OutcomeResult:
    """``derive_outcome_events`` of one staged shard, with the whole data's ``ends``."""
    from qis_fhir.outcomes.events import derive_outcome_events

    return derive_outcome_events(_shard_tables(staged, shard), mapping, ends)


def _ends(args: tuple) -> dict[str, float]:
    return shard_ends(*args)


def _derive(args: tuple) -> OutcomeResult:
    return derive_shard(*args)


def merge_counts(a: Any, b: Any, key: str = "") -> Any:
    """Two shards' summaries as one: counts add, nested dicts merge, anything else must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge_counts(a[k], b[k], k) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) and key not in NOT_COUNTS:
        return a + b
    if a != b:
        raise AssertionError(f"shard summaries disagree on {key!r}")  # a bug: every shard sees one mapping and end
    return a


def shard_count(folder: Path | str, rows_per_shard: int = SHARD_ROWS) -> int:
    """Shards for an extract: its rows (observations counted by their mapped share, unknown here, as
    a tenth) over ``rows_per_shard``."""
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(table_path(folder, t)).metadata.num_rows // (10 if t == "observations" else 1) for t in TABLE_NAMES)
    return max(1, math.ceil(rows / rows_per_shard))


def _mapped(pool: ProcessPoolExecutor | None, fn, items: list) -> Iterator:
    return map(fn, items) if pool is None else pool.map(fn, items)


def derive_outcomes_sharded(folder: Path | str, mapping: MappingSet, *, shards: int | None = None,
                            workers: int = 1) -> OutcomeResult:
    """``derive_outcome_events`` of an extract folder's tables, ``shards`` patient shards at a time
    over ``workers`` processes (default shards: ``shard_count``, and at least one per worker, or a
    small extract would leave all but one idle); the same result whatever both are.

    The staging pass runs in a child process (``memory.in_child``): DuckDB's allocator keeps what the
    pass used, up to its memory limit on a large extract, and that would sit beside the shards'
    derivation."""
    from qis_fhir.fhir.extract import require_extract
    from qis_fhir.memory import FORK, in_child

    folder = Path(folder)
    require_extract(folder)
    shards = shards or max(shard_count(folder), workers)
    staged = Path(tempfile.mkdtemp(prefix=".outcome-shards-", dir=folder))
    try:
        in_child(stage_shards, folder, staged, shards, mapping)
        pool = ProcessPoolExecutor(workers, mp_context=FORK) if workers > 1 and shards > 1 else None
        try:
            ends_each = list(_mapped(pool, _ends, [(staged, s, mapping) for s in range(shards)]))
            ends = {k: max(e[k] for e in ends_each) for k in ends_each[0]}
            results = list(_mapped(pool, _derive, [(staged, s, mapping, ends) for s in range(shards)]))
        finally:
            if pool is not None:
                pool.shutdown()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return combine_results(results, mapping)


def combine_results(results: list[OutcomeResult], mapping: MappingSet) -> OutcomeResult:
    """The shards' results as the one result of the whole data: events and units concatenated and
    sorted as ``derive_outcome_events`` sorts them, summary counts added."""
    import pandas as pd

    from qis_fhir.outcomes.control import check_control_summary, empty_units
    from qis_fhir.outcomes.events import OutcomeResult, empty_events

    events = [r.events for r in results if len(r.events)]
    events = pd.concat(events, ignore_index=True) if events else empty_events()
    events = events.sort_values(["bucket", "treatment_code", "start", "event_id"], kind="stable").reset_index(drop=True)
    summary = results[0].summary
    for r in results[1:]:
        summary = merge_counts(summary, r.summary)
    units = None
    if mapping.control_measures:
        parts = [r.units for r in results if len(r.units)]
        units = pd.concat(parts, ignore_index=True) if parts else empty_units()
        units = units.sort_values(["measure", "treatment_code", "period", "unit_id"], kind="stable").reset_index(drop=True)
        for s in summary["control"]["measures"].values():
            check_control_summary(s)
    return OutcomeResult(events=events, summary=summary, units=units)
