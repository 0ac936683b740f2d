"""Extraction of one nightly FHIR bulk export into typed, pseudonymous Parquet tables, fanned out
over the export's part files.

Five assets, one graph: a ``@graph_multi_asset`` with an ``AssetSpec`` per table, so lineage shows
each resource type (``fhir_patients``, ``fhir_conditions``, ``fhir_medication_requests``,
``fhir_observations``, ``fhir_encounters``), each drawn from the export it was read from and the
mapping set whose quality suites check it, each with its own column schema, row count and read /
accepted / quarantined lines. Its ops:

1. ``plan_extract``: the partition's export planned (``qis_fhir.fhir.extract.plan_extraction``: its
   files, and the tasks they split into, ``qis_fhir.fhir.parallel.tasks``), one ``DynamicOut``
   output per task, and the run's staging folder made beside the partition's folder (named after
   the run, so a re-execution from failure finds the parts of the tasks that succeeded);
2. ``extract_task``, one step per task: its files extracted into the staging folder
   (``parallel.stage_task``); the executor decides where each runs (one process with the default
   in-process executor, one process each with ``multiprocess``, a Celery worker or a pod on a
   shared volume: docs/operations.md, "Scaling out");
3. ``merge_extract``: under the run folder's lock (``start_run``) the staged outputs merged into a
   new run for the partition (``qis_fhir.stages.extract_staged_step``), the extract's quality step,
   then the five materialisations and their ``every_line_accounted_for`` checks.

What passes between ops is the plan (file labels, task indices, settings), the staging folder's
path, the start time and each task's counts: never rows, never a file name that may name a patient,
never the site's secret, which each op that reads files takes from ``site.setup()`` itself. The
tables, quarantine and ``summary.json`` are those of ``extract_export`` in one process, row for row
(``tests/pipelines/test_extract_fanout.py``).
"""

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetIn,
    AssetOut,
    AssetSpec,
    DynamicOut,
    DynamicOutput,
    In,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    graph_multi_asset,
    op,
)

from pipelines.assets.export import EXPORT
from pipelines.assets.metadata import OWNERS, code_version, column_schema, tags
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.fhir.schema import TABLE_OF_TYPE, TABLES

if TYPE_CHECKING:
    from qis_fhir.fhir.extract import ExtractPlan

COUNTS_CHECK = "every_line_accounted_for"
#: table -> the FHIR resource type its rows come from
TYPE_OF_TABLE = {table: rtype for rtype, table in TABLE_OF_TYPE.items()}


def table_asset(table: str) -> str:
    """The asset key of one extract table: ``fhir_<table>``."""
    return f"fhir_{table}"


#: the asset keys of the extract tables, in TABLE_NAMES order
TABLE_ASSETS = [table_asset(t) for t in TABLE_NAMES]
TABLE_OF_ASSET = dict(zip(TABLE_ASSETS, TABLE_NAMES))


def _spec(table: str) -> AssetSpec:
    return AssetSpec(
        table_asset(table),
        partitions_def=daily_exports,
        group_name="extract",
        kinds={"parquet"},
        owners=OWNERS,
        tags=tags("extract", phi=True),
        code_version=code_version(uses_mapping=True),  # the mapping's quality suites check it
        deps=[EXPORT, "mapping_set"],
        metadata={"dagster/column_schema": column_schema(TABLES[table]), "resource_type": TYPE_OF_TABLE[table]},
        description=(
            f"The partition's {TYPE_OF_TABLE[table]} resources as extract/{table}.parquet (every rejected line in "
            "quarantine.ndjson: file, line, reason, never its content). Patient ids are keyed hashes."
        ),
    )


#: the extract's checks, one per table
CHECK_SPECS = [
    AssetCheckSpec(COUNTS_CHECK, asset=table_asset(t), blocking=True, partitions_def=daily_exports,
                   description=f"{TYPE_OF_TABLE[t]} lines: read = accepted + quarantined")
    for t in TABLE_NAMES
]


class Planned(NamedTuple):
    """``plan_extract``'s plan, for every later op: what to read, where the parts go, and when the
    extraction began."""

    plan: "ExtractPlan"  # loaded with the steps, not with the code location (qis_fhir.fhir loads lazily)
    staging: str  # parallel.staging_folder of the run that planned: a re-execution from failure reuses it
    started: float  # time.time(): the tasks may run on other machines


def _remove_stale_staging(context: OpExecutionContext, site: SiteConfig) -> None:
    """Remove the staging folders that runs of this partition left when a task failed (no merge
    followed): those of runs the instance knows as finished, or does not know."""
    from qis_fhir.fhir.parallel import staging_folders

    for run_id, folder in staging_folders(site.out_path(context.partition_key)).items():
        if run_id == context.run_id:
            continue
        other = context.instance.get_run_by_id(run_id)
        if other is None or other.is_finished:
            shutil.rmtree(folder, ignore_errors=True)
            context.log.info(f"removed {folder.name}, left by run {run_id}, which ended before merging its parts")


@op(ins={"export": In(Nothing), "mapping": In(Nothing)}, out={"planned": Out(Planned), "tasks": DynamicOut(tuple)})
def plan_extract(context: OpExecutionContext, site: SiteConfig):
    """The partition's export planned, one output per task of its files, and the run's staging folder."""
    from qis_fhir.errors import QisError
    from qis_fhir.fhir.extract import plan_extraction
    from qis_fhir.fhir.parallel import staging_folder
    from qis_fhir.runfolder import EXTRACT, record_failed_start

    setup = site.setup()  # before the long extraction: a bad mapping or key fails fast
    try:
        plan, _ = plan_extraction(site.export_path(context.partition_key), secret=setup.secret, validate=site.validation,
                                  sample_rate=site.sample_rate)
    except QisError as exc:  # a missing or empty export: recorded in <date>.partial, as a run that failed reading it
        record_failed_start(site.out_path(context.partition_key), exc, command="dagster", stage=EXTRACT)
        raise
    _remove_stale_staging(context, site)
    # one staging folder per Dagster run: two runs of a partition never mix their parts (the lock lets one merge)
    staging = staging_folder(site.out_path(context.partition_key), context.run_id)
    staging.mkdir(parents=True, exist_ok=True)  # exist_ok: the step retried in this run
    yield Output(Planned(plan, str(staging), time.time()), "planned", metadata={"files": len(plan.labels), "tasks": len(plan.tasks)})
    for n, task in enumerate(plan.tasks):  # largest first, so the longest task starts first
        yield DynamicOutput(task, mapping_key=f"task_{n}", output_name="tasks")


@op
def extract_task(context: OpExecutionContext, site: SiteConfig, planned: Planned, task: tuple) -> dict:
    """One task's files into the run's staging folder; its counts (what ``summary.json`` will hold of them)."""
    from qis_fhir.fhir.parallel import stage_task

    secret = site.setup().secret  # where the files are read: the secret is in no op's output or config
    return stage_task(planned.plan, task, Path(planned.staging), secret)


@op(out={**{table_asset(t): Out(Nothing) for t in TABLE_NAMES}, **{c.get_python_identifier(): Out(Nothing) for c in CHECK_SPECS}})
def merge_extract(context: OpExecutionContext, site: SiteConfig, planned: Planned, parts: list):
    """The staged parts merged into a new run of the partition, its quality step, the five tables."""
    from qis_fhir.fhir.extract import EXTRACT_DIR, SUMMARY_FILE
    from qis_fhir.runfolder import EXTRACT, start_run
    from qis_fhir.stages import extract_staged_step, quality_report_path, quality_step

    out_dir = site.out_path(context.partition_key)
    staging = Path(planned.staging)
    mapping = site.load_mapping()
    try:
        # a fresh run folder for the partition: the previous materialisation (its extract and everything
        # derived from it) stays readable until this one is complete, then is replaced whole
        with start_run(out_dir, command="dagster", planned=[EXTRACT]) as run:
            summary = extract_staged_step(run, planned.plan, staging, parts, seconds=time.time() - planned.started)
            # its verdict is the checks' (pipelines/assets/checks.py), read back from quality/extract.json
            quality_step(run, mapping, "extract")  # swapped in with the tables, pass or fail
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    export_wide = {
        "export_totals": MetadataValue.json(summary.totals),  # read, accepted, quarantined, skipped: every type
        "quarantine_reasons": MetadataValue.json(summary.quarantine_reasons),
        "validate": summary.validate,
        "seconds": round(summary.seconds, 2),
        "summary": MetadataValue.path(str(out_dir / EXTRACT_DIR / SUMMARY_FILE)),
        "quality_report": MetadataValue.path(str(quality_report_path(out_dir, "extract"))),
    }
    for table in TABLE_NAMES:
        lines = summary.by_type.get(TYPE_OF_TABLE[table], {"read": 0, "accepted": 0, "quarantined": 0})
        key = table_asset(table)
        yield Output(None, key, metadata={
            "dagster/row_count": summary.rows.get(table, 0),
            "read": lines["read"],
            "accepted": lines["accepted"],
            "quarantined": lines["quarantined"],
            "file": MetadataValue.path(str(out_dir / EXTRACT_DIR / f"{table}.parquet")),
            **export_wide,
        })
        # the extraction raises before it returns when a count does not add up (check_invariants);
        # this shows the type's own figures beside the verdict
        yield AssetCheckResult(check_name=COUNTS_CHECK, asset_key=key, passed=lines["read"] == lines["accepted"] + lines["quarantined"],
                               metadata={k: lines[k] for k in ("read", "accepted", "quarantined")})


@graph_multi_asset(
    name="fhir_extract",
    outs={table_asset(t): AssetOut() for t in TABLE_NAMES},
    ins={"export": AssetIn(EXPORT, dagster_type=Nothing), "mapping": AssetIn("mapping_set", dagster_type=Nothing)},
    partitions_def=daily_exports,
    check_specs=CHECK_SPECS,
)
def _fhir_extract(export, mapping):
    planned, tasks = plan_extract(export=export, mapping=mapping)
    parts = tasks.map(lambda task: extract_task(planned, task))
    outs = merge_extract(planned, parts.collect())
    return outs._asdict()


#: the graph with each table's own spec (a graph takes its deps from its inputs, the rest from here)
fhir_extract = _fhir_extract.map_asset_specs(lambda spec: _spec(TABLE_OF_ASSET[spec.key.to_user_string()]))
