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
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.fhir.scan import connect, shard_sql, table_path
from qis_fhir.fhir.schema import TABLES

if TYPE_CHECKING:
    import pandas as pd

    from qis_fhir.mapping import MappingSet
    from qis_fhir.outcomes.events import OutcomeResult

#: staged rows (all five tables) per shard. A shard's worker holds several times its rows' size (the
#: tables in pandas and the derivation's merges): at 2 million Observations (577,000 staged rows) one
#: shard took 363 MiB in its worker, two took 236 MiB each in the same time (6.3 s), three 232 MiB in 7.3 s
SHARD_ROWS = 250_000
#: shards a worker process derives before a fresh one replaces it: what pandas' and Arrow's allocators
#: keep of one shard stays beside the next one's peak. At 20 million Observations (18 shards) a worker
#: that derived three shards held 249-270 MiB, one that derived one 228-253 MiB; the stage took 73.7 s
#: against 69-71 s (a fresh worker forked from the server per shard)
SHARDS_PER_WORKER = 1
#: DuckDB's memory limit for the staging pass, below the scans' (``scan.MEMORY_LIMIT``): the pass
#: writes every shard's partition at once, and at 256 MB it took 329 MiB over its imports on a
#: 20-million-Observation extract (10 shards), at 128 MB 203 MiB, at 64 MB 145 MiB, against 43 MiB
#: at 2 million (one shard); 64 MB costs 4 s more CPU there (26 s against 22 s), spilling to disk
STAGE_MEMORY_LIMIT = "64MB"
#: observation columns the derivation reads (all but the provenance)
OBS_COLUMNS = [c for c in TABLES["observations"].names if c not in ("source_file", "source_line")]
#: summary figures that are not counts: the same in every shard, never added
NOT_COUNTS = frozenset({"complete_years_through"})
#: the tables ``events.data_ends`` reads
ENDS_TABLES = ("observations", "encounters")
_ROW = "_row"  # the row's place in the extract file


def mapped_codes(mapping: MappingSet) -> list[str]:
    """The LOINC codes whose readings the mapping's measures and control measures use."""
    codes = {m.loinc for m in mapping.measures.values()}
    codes |= {r.loinc for m in mapping.control_measures.values() for r in m.readings}
    return sorted(codes)


def _literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def stage_shards(folder: Path, staged: Path, shards: int, mapping: MappingSet, threads: int = 1) -> None:
    """Write the pushed-down rows of each table of the extract in ``folder`` into
    ``staged/<table>/shard=<n>/`` (one DuckDB pass per table, on ``threads`` threads, bounded memory)."""
    with connect(folder, memory_limit=STAGE_MEMORY_LIMIT, threads=threads) as con:
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


def _shard_tables(staged: Path, shard: int, tables: tuple[str, ...] = TABLE_NAMES) -> dict[str, pd.DataFrame]:
    """One shard's staged ``tables`` as ``load_extract`` types them, in extract file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for table in tables:
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

    return data_ends(_shard_tables(staged, shard, ENDS_TABLES), mapping)


def derive_shard(staged: Path, shard: int, mapping: MappingSet, ends: dict[str, float]) -> OutcomeResult:
    """``derive_outcome_events`` of one staged shard, with the whole data's ``ends``."""
    from qis_fhir.outcomes.events import derive_outcome_events

    return derive_outcome_events(_shard_tables(staged, shard), mapping, ends)


def _ends(args: tuple) -> dict[str, float]:
    return shard_ends(*args)


def _derive(args: tuple) -> None:
    """A worker's shard: derived, and its result left in the staging folder for ``_combine``, not
    sent back: the process that waits for the shards never holds their events."""
    staged, shard = args[0], args[1]
    result = derive_shard(*args)
    for part in ("events", "units", "summary"):
        with open(_result_path(staged, shard, part), "wb") as fh:
            pickle.dump(getattr(result, part), fh, protocol=pickle.HIGHEST_PROTOCOL)


def _result_path(staged: Path, shard: int, part: str) -> Path:
    return Path(staged) / f"{part}-{shard}.pickle"


def _combine(staged: Path, shards: int, mapping: MappingSet, write_to: Path | None) -> OutcomeResult | dict:
    """The shards' results as one (``combine_events``, ``combine_units``, ``combine_summaries``),
    one part at a time, so that the shards' events are let go before their control units are read;
    written into ``write_to`` if given, and then only the summary is returned."""
    from qis_fhir.outcomes.events import OutcomeResult

    def parts(part: str) -> list:
        out = []
        for shard in range(shards):
            with open(_result_path(staged, shard, part), "rb") as fh:
                out.append(pickle.load(fh))  # written by _derive in this stage, in a folder of its own
        return out

    result = OutcomeResult(events=combine_events(parts("events")), summary=combine_summaries(parts("summary"), mapping),
                           units=combine_units(parts("units")) if mapping.control_measures else None)
    if write_to is None:
        return result
    result.write(write_to)
    return result.summary


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


def derive_outcomes_sharded(folder: Path | str, mapping: MappingSet, *, shards: int | None = None,
                            workers: int = 1) -> OutcomeResult:
    """``derive_outcome_events`` of an extract folder's tables, ``shards`` patient shards at a time
    over ``workers`` processes (default shards: ``shard_count``, and at least one per worker, or a
    small extract would leave all but one idle); the same result whatever both are."""
    return _sharded(Path(folder), mapping, shards, workers, None)


def write_outcomes_sharded(folder: Path | str, mapping: MappingSet, *, shards: int | None = None, workers: int = 1) -> dict:
    """``derive_outcomes_sharded`` written into ``folder`` (``OutcomeResult.write``) by a worker; its summary.
    Only the summary comes back: the caller never holds the events, nor what deriving them used."""
    return _sharded(Path(folder), mapping, shards, workers, Path(folder))


def _sharded(folder: Path, mapping: MappingSet, shards: int | None, workers: int, write_to: Path | None) -> OutcomeResult | dict:
    """Every step in workers of the stages' fork server (``qis_fhir.forkserver``), so that what
    DuckDB's and pandas' allocators keep goes away with them and the caller stays as small as it was:
    the staging pass (on ``workers`` DuckDB threads), the shards' two passes (``workers`` processes),
    then the combine."""
    from qis_fhir.fhir.extract import require_extract
    from qis_fhir.forkserver import OUTCOMES, held, in_rounds, in_worker

    require_extract(folder)
    shards = shards or max(shard_count(folder), workers)
    staged = Path(tempfile.mkdtemp(prefix=".outcome-shards-", dir=folder))
    try:
        with held(*OUTCOMES):
            in_worker(stage_shards, folder, staged, shards, mapping, max(1, workers))
            ends_each = in_rounds(_ends, [(staged, s, mapping) for s in range(shards)], workers, SHARDS_PER_WORKER)
            ends = {k: max(e[k] for e in ends_each) for k in ends_each[0]}
            in_rounds(_derive, [(staged, s, mapping, ends) for s in range(shards)], workers, SHARDS_PER_WORKER)
            return in_worker(_combine, staged, shards, mapping, write_to)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def combine_events(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards' events as the whole data's: concatenated and sorted as ``derive_outcome_events`` sorts them."""
    import pandas as pd

    from qis_fhir.outcomes.events import empty_events

    parts = [p for p in parts if len(p)]
    events = pd.concat(parts, ignore_index=True) if parts else empty_events()
    return events.sort_values(["bucket", "treatment_code", "start", "event_id"], kind="stable").reset_index(drop=True)


def combine_units(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards' control units as the whole data's, sorted as ``derive_control_units`` sorts them."""
    import pandas as pd

    from qis_fhir.outcomes.control import empty_units

    parts = [p for p in parts if len(p)]
    units = pd.concat(parts, ignore_index=True) if parts else empty_units()
    return units.sort_values(["measure", "treatment_code", "period", "unit_id"], kind="stable").reset_index(drop=True)


def combine_summaries(summaries: list[dict], mapping: MappingSet) -> dict:
    """The shards' summaries as the whole data's: counts added (``merge_counts``), control counts checked."""
    from qis_fhir.outcomes.control import check_control_summary

    summary = summaries[0]
    for other in summaries[1:]:
        summary = merge_counts(summary, other)
    if mapping.control_measures:
        for s in summary["control"]["measures"].values():
            check_control_summary(s)
    return summary
