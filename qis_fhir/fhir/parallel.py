"""Extraction of an export's files in several processes, with the result of reading them in one.

Each file is extracted into its own temporary outputs (five tables and a quarantine) by a worker of
a ``ProcessPoolExecutor``; the parent then appends them in the export's file order into the final
tables and quarantine, and adds up the counts. So the tables hold the same rows in the same order,
the quarantine the same records, and ``summary.json`` the same counts (every line accounted for,
per file) as with one process; only the row-group boundaries of the Parquet files differ.

One thing is carried from file to file: the Medications read so far, which later requests may name
(``fields.py``). Files that may hold a Medication or name one (``Medication`` and
``MedicationRequest`` bulk files, NDJSON files of mixed types, JSON files) therefore go to one worker
together, in file order; every other bulk file (Observation, Encounter, Patient, Condition, types
that are skipped) is a task of its own.

An orchestrator runs the same tasks as steps of its own, on other processes or machines (the Dagster
extract, ``pipelines/assets/extract.py``): ``extract.plan_extraction`` plans them, ``stage_task``
runs one into a staging folder every step can reach (``staging_folder``), and ``finish_staged``
merges them and writes the summary, through the merge and summary the process pool uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from qis_fhir.errors import InputNotFoundError
from qis_fhir.fhir.extract import EXTRACT_DIR, QUARANTINE_FILE, ExtractPlan, _extract_files, finish_extraction
from qis_fhir.fhir.schema import TABLES
from qis_fhir.fhir.sinks import TableSink
from qis_fhir.fhir.sources import SourceFile
from qis_fhir.fhir.summary import ExtractSummary

#: bulk-file types whose files depend on the files before them (the Medications they name)
CHAINED_TYPES = frozenset({"Medication", "MedicationRequest"})


def _chained(src: SourceFile) -> bool:
    return src.kind == "json" or src.resource_type is None or src.resource_type in CHAINED_TYPES


def tasks(sources: list[SourceFile]) -> list[list[int]]:
    """Indices of ``sources`` per task: the chained files as one task, every other file alone;
    largest first, so the longest task starts first."""
    chain = [i for i, s in enumerate(sources) if _chained(s)]
    alone = [[i] for i, s in enumerate(sources) if not _chained(s)]
    out = ([chain] if chain else []) + alone
    return sorted(out, key=lambda t: -sum(sources[i].size for i in t))


def _part(tmp: Path, i: int) -> Path:
    return tmp / f"{i:06d}"


def extract_task(job: tuple) -> dict:
    """One task, ``(indices, sources, tmp, args)``: each of its files into its own part of ``tmp``
    (``_part``); returns the task's ``counts()``. A task that fails leaves none of its parts."""
    indices, sources, tmp, args = job

    def open_file(run, k: int) -> None:
        if k:
            run.reopen(_part(tmp, indices[k]))

    try:
        _, counts = _extract_files([sources[i] for i in indices], _part(tmp, indices[0]), args, open_file=open_file)
    except BaseException:
        for i in indices:
            shutil.rmtree(_part(tmp, i), ignore_errors=True)
        raise
    return counts


def stage_task(plan: ExtractPlan, task: tuple[int, ...], staging: Path, secret: bytes) -> dict:
    """One of ``plan.tasks`` extracted into ``staging`` (a folder every step can reach), for an
    orchestrator running the tasks as steps of their own: the files found again from the plan
    (``ExtractPlan.sources``); returns the task's counts, plain data holding what ``summary.json``
    holds (per file by its label). Raises ``InputNotFoundError`` when ``staging`` is gone (removed
    once the run it was made for ended): the merge would lack the other tasks' parts."""
    staging = Path(staging)
    if not staging.is_dir():
        raise InputNotFoundError(f"the staging folder {staging} is gone (removed once its run ended); extract the export again")
    return extract_task((list(task), plan.sources(secret), staging, plan.args(secret)))


def add_counts(parts: list[dict]) -> dict:
    """Workers' ``counts()`` as one: per-file figures are disjoint, every other figure adds up."""
    out = {"by_type": {}, "skipped_types": {}, "skipped_paths": {}, "reasons": {}, "dropped_components": {}, "without_rows": {},
           "by_file": {}, "entries_beyond_cap": {}, "not_written": {}, "written": 0, "validated": 0}
    for p in parts:
        for t, n in p["by_type"].items():
            out["by_type"][t] = [a + b for a, b in zip(out["by_type"].get(t, [0, 0, 0]), n)]
        for k in ("skipped_types", "reasons", "dropped_components", "without_rows", "skipped_paths"):
            for name, n in p[k].items():
                out[k][name] = out[k].get(name, 0) + n
        for k in ("by_file", "entries_beyond_cap", "not_written"):
            out[k].update(p[k])
        out["written"] += p["written"]
        out["validated"] += p["validated"]
    return out


def merge_outputs(n: int, tmp: Path, out_dir: Path, chunk_rows: int) -> dict[str, int]:
    """Append the files' outputs, in file order, into ``out_dir``'s tables and quarantine."""
    import pyarrow.parquet as pq

    rows = {}
    extract_dir = out_dir / EXTRACT_DIR
    extract_dir.mkdir(parents=True, exist_ok=True)
    for name, schema in TABLES.items():
        sink = TableSink(name, schema, extract_dir / f"{name}.parquet", chunk_rows)
        try:
            for i in range(n):
                with pq.ParquetFile(_part(tmp, i) / EXTRACT_DIR / f"{name}.parquet") as f:
                    for batch in f.iter_batches():
                        sink.append(batch)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        rows[name] = sink.count
    quarantine = out_dir / QUARANTINE_FILE
    partial = quarantine.with_name(f".{quarantine.name}.partial")
    with open(partial, "wb") as fh:
        for i in range(n):
            with open(_part(tmp, i) / QUARANTINE_FILE, "rb") as part:
                shutil.copyfileobj(part, fh)
    os.replace(partial, quarantine)
    return rows


def merge_staged(plan: ExtractPlan, staging: Path, out_dir: Path, parts: list[dict]) -> tuple[dict[str, int], dict]:
    """Every task's outputs in ``staging`` appended into ``out_dir``, and their counts added up:
    what one process would have written and counted."""
    if len(parts) != len(plan.tasks):
        raise ValueError(f"{len(parts)} task counts for the plan's {len(plan.tasks)} tasks")
    missing = [i for i in range(len(plan.labels)) if not _part(Path(staging), i).is_dir()]
    if missing:
        raise InputNotFoundError(f"{len(missing)} of the {len(plan.labels)} files' parts are missing from {staging}; extract the export again")
    return merge_outputs(len(plan.labels), Path(staging), Path(out_dir), plan.chunk_rows), add_counts(parts)


def finish_staged(plan: ExtractPlan, staging: Path, out_dir: Path, parts: list[dict], *, seconds: float) -> ExtractSummary:
    """An extraction whose tasks ran as steps of their own (``stage_task``) finished into ``out_dir``:
    its tables, quarantine and ``summary.json``, the same as ``extract_export`` writes."""
    rows, counts = merge_staged(plan, staging, out_dir, parts)
    return finish_extraction(plan, rows, counts, Path(out_dir), seconds=seconds)


def staging_folder(out: Path, run_id: str) -> Path:
    """Where the tasks of one orchestrated extraction into the run folder ``out`` stage their outputs
    (``stage_task``): a hidden sibling, ``.DIR.extract-<run id>``, beside the run folder's lock file.
    Not inside ``DIR``: the run that merges the parts replaces ``DIR`` whole, and a first ``DIR``
    holding nothing but the staging folder would be refused as a folder no run wrote."""
    return out.with_name(f"{_staging_prefix(out)}{run_id}")


def staging_folders(out: Path) -> dict[str, Path]:
    """The staging folders of ``out`` that exist, by the id of the run that made them (a run that
    failed before its merge leaves its tasks' parts: the next run removes those of finished runs)."""
    prefix = _staging_prefix(out)
    if not out.parent.is_dir():
        return {}
    return {p.name[len(prefix):]: p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()}


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.extract-"


def extract_parallel(plan: ExtractPlan, sources: list[SourceFile], out_dir: Path, secret: bytes, workers: int) -> tuple[dict[str, int], dict]:
    """``_extract_files`` of ``sources`` over ``workers`` processes; the same outputs and counts."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-parts-", dir=out_dir))
    try:
        jobs = [(task, sources, tmp, plan.args(secret)) for task in plan.tasks]
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(extract_task, jobs))
        return merge_staged(plan, tmp, out_dir, parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
