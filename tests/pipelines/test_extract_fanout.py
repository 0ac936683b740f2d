"""The extract asset fans out over the export's part files: with Dagster's multiprocess executor each
task of the export runs as a step of its own, in a process of its own, and the partition gets the
tables, quarantine and summary that ``extract_export`` writes in one process."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetSelection,
    DagsterInstance,
    Definitions,
    ReexecutionOptions,
    build_reconstructable_job,
    define_asset_job,
    execute_job,
    in_process_executor,
    materialize,
    multiprocess_executor,
)

from pipelines.assets import fhir_export, fhir_extract, mapping_set
from pipelines.assets.extract import TABLE_ASSETS
from pipelines.dev import prepare_home
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig, site_config_from_env
from qis_fhir.fhir import TABLE_NAMES, extract_export
from qis_fhir.fhir.extract import plan_extraction

PARTITION = "2026-11-27"
BUNDLE = "Fredrick_Kris_ec6a5bb6-b412-4bb6-8219-11d66f52ae8b.json"  # a file name that names a patient
TASK_STEP = "fhir_extract.extract_task["


def fanout_job(executor: str):
    """The extract over ``executor``, bound to the site of the environment (QIS_*), as a code location
    is: each step's process builds it again from this function."""
    job = define_asset_job("extract_fanout", selection=AssetSelection.assets(mapping_set, fhir_extract), partitions_def=daily_exports,
                           executor_def={"multiprocess": multiprocess_executor, "in_process": in_process_executor}[executor])
    defs = Definitions(assets=[fhir_export, mapping_set, fhir_extract], jobs=[job], resources={"site": site_config_from_env()})
    return defs.resolve_job_def("extract_fanout")


def _reconstructable(executor: str):
    return build_reconstructable_job(Path(__file__).stem, fanout_job.__name__, reconstructable_kwargs={"executor": executor},
                                     reconstructor_working_directory=str(Path(__file__).parent))


def _site_env(export, tmp_path, monkeypatch) -> tuple[SiteConfig, bytes]:
    """The site's environment (the steps' processes inherit it), its config, and its secret."""
    secret_path = tmp_path / "site.secret"
    for var, value in {"QIS_EXPORT_DIR": export, "QIS_OUT_ROOT": tmp_path / "out", "QIS_SITE_SECRET": secret_path}.items():
        monkeypatch.setenv(var, str(value))
    site = SiteConfig(export_dir=str(export), out_root=str(tmp_path / "out"), site_secret_path=str(secret_path))
    return site, site.setup().secret  # the secret created here, read by every step


def _fail_the_ordered_task(monkeypatch):
    """Make the task of the requests and the Bundle fail (a disk full); returns how to stop it."""
    import qis_fhir.fhir.parallel as parallel

    stage_task = parallel.stage_task

    def failing(plan, task, staging, secret):
        if len(task) > 1:
            raise OSError("disk full")
        return stage_task(plan, task, staging, secret)

    monkeypatch.setattr(parallel, "stage_task", failing)
    return lambda: monkeypatch.setattr(parallel, "stage_task", stage_task)


def _step_starts(instance, run_id) -> list:
    return [e for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.event_type_value == "STEP_START"]


@pytest.fixture(scope="module")
def part_export(tmp_path_factory, fixtures_dir):
    """A bulk export in several part files: plain and gzipped parts of one type, a gzip part cut short,
    bad lines, a file that is not FHIR, and the requests and a Bundle named after its patient, which go
    to one ordered task."""
    export = tmp_path_factory.mktemp("parts")
    src = fixtures_dir / "synthea-bulk-10"
    for name in ("Patient.000.ndjson", "Condition.000.ndjson", "MedicationRequest.000.ndjson", "LICENSE"):
        shutil.copy(src / name, export / name)
    encounters = (src / "Encounter.000.ndjson").read_bytes().splitlines(keepends=True)
    half = len(encounters) // 2
    (export / "Encounter.000.ndjson").write_bytes(b"".join(encounters[:half]))
    (export / "Encounter.001.ndjson.gz").write_bytes(gzip.compress(b"".join(encounters[half:]) + b"{not json\n\n"))
    conditions = (src / "Condition.000.ndjson").read_bytes().splitlines(keepends=True)
    (export / "Condition.001.ndjson.gz").write_bytes(gzip.compress(b"".join(conditions[:40]))[:-20])  # truncated
    shutil.copy(fixtures_dir / "synthea-bundles" / BUNDLE, export / BUNDLE)
    return export


def _outputs(folder):
    summary = json.loads((folder / "extract" / "summary.json").read_text())
    summary.pop("seconds")
    tables = {t: pq.read_table(folder / "extract" / f"{t}.parquet").to_pandas() for t in TABLE_NAMES}
    return summary, tables, (folder / "quarantine.ndjson").read_bytes()


def _staging_folders(out_root):
    return sorted(p.name for p in out_root.glob(f".{PARTITION}.extract-*"))


def _assert_as_one_process_writes(part_export, folder, site, secret, tmp_path):
    """``folder``'s tables row for row, quarantine byte for byte and summary counts are those of
    ``extract_export`` in one process."""
    extract_export(part_export, tmp_path / "one", secret=secret, validate=site.validation, sample_rate=site.sample_rate)
    dag, ref = _outputs(folder), _outputs(tmp_path / "one")
    assert dag[0] == ref[0]
    for table in TABLE_NAMES:
        pd.testing.assert_frame_equal(dag[1][table], ref[1][table], check_dtype=True)
    assert dag[2] == ref[2]
    assert {"invalid_json", "corrupt_file"} <= set(ref[0]["quarantine_reasons"])  # what the quarantine comparison covers


def test_multiprocess_executor_runs_a_step_per_task_and_writes_what_one_process_writes(part_export, tmp_path, monkeypatch):
    site, secret = _site_env(part_export, tmp_path, monkeypatch)
    plan, _ = plan_extraction(part_export, secret=secret)
    assert len(plan.tasks) == 6  # the requests and the Bundle in one task, every other part file alone

    with DagsterInstance.from_config(str(prepare_home(tmp_path / "home"))) as instance:
        result = execute_job(_reconstructable("multiprocess"), instance, tags={"dagster/partition": PARTITION},
                             run_config={"execution": {"config": {"max_concurrent": 2}}})
        assert result.success
        starts = _step_starts(instance, result.run_id)
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}

    tasks = {e.step_key: e.dagster_event.pid for e in starts if e.step_key.startswith(TASK_STEP)}
    assert sorted(tasks) == [f"{TASK_STEP}task_{n}]" for n in range(6)]
    assert len(set(tasks.values())) == 6  # each task in a process of its own
    assert materialized == {"mapping_set", *TABLE_ASSETS}
    _assert_as_one_process_writes(part_export, tmp_path / "out" / PARTITION, site, secret, tmp_path)
    assert _staging_folders(tmp_path / "out") == []  # removed once merged
    # what Dagster stored of the run (its event log, the ops' outputs) holds neither the site's secret
    # nor a file name that names a patient
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert b"Encounter.001.ndjson.gz" in stored  # the plan, by the files' labels
    needles = {"patient's name": b"Fredrick", "file's id": b"ec6a5bb6", "secret": secret, "secret in hex": secret.hex().encode()}
    assert {what for what, needle in needles.items() if needle in stored} == set()


def test_a_failed_task_leaves_its_parts_until_the_next_run_removes_them(part_export, tmp_path, instance, monkeypatch):
    """A run that fails in one task never merges: the partition keeps its previous run, and the next
    run of the partition removes what the failed run staged."""
    site = SiteConfig(export_dir=str(part_export), out_root=str(tmp_path / "out"), site_secret_path=str(tmp_path / "site.secret"))
    stop_failing = _fail_the_ordered_task(monkeypatch)
    failed = materialize([mapping_set, fhir_extract], partition_key=PARTITION, resources={"site": site}, instance=instance,
                         raise_on_error=False)
    assert not failed.success
    assert _staging_folders(tmp_path / "out") == [f".{PARTITION}.extract-{failed.run_id}"]
    staged = tmp_path / "out" / _staging_folders(tmp_path / "out")[0]
    assert len(list(staged.iterdir())) == 5  # the other tasks' parts, one per file; none of the failed task's
    assert not (tmp_path / "out" / PARTITION).exists()  # nothing merged

    stop_failing()
    again = materialize([mapping_set, fhir_extract], partition_key=PARTITION, resources={"site": site}, instance=instance)
    assert again.success and _staging_folders(tmp_path / "out") == []
    assert json.loads((tmp_path / "out" / PARTITION / "run.json").read_text())["status"] == "complete"


def test_a_run_failed_in_a_task_re_executed_from_failure_runs_that_task_again_and_merges_all(part_export, tmp_path, monkeypatch):
    """Dagster's "re-execute from failure" reuses the plan and the tasks that succeeded: their parts
    wait in the failed run's staging folder, and the merge takes them with the task run again."""
    site, secret = _site_env(part_export, tmp_path, monkeypatch)
    with DagsterInstance.from_config(str(prepare_home(tmp_path / "home"))) as instance:
        stop_failing = _fail_the_ordered_task(monkeypatch)
        failed = execute_job(_reconstructable("in_process"), instance, tags={"dagster/partition": PARTITION}, raise_on_error=False)
        assert not failed.success
        assert _staging_folders(tmp_path / "out") == [f".{PARTITION}.extract-{failed.run_id}"]

        stop_failing()
        again = execute_job(_reconstructable("in_process"), instance, tags={"dagster/partition": PARTITION},  # as the UI copies them
                            reexecution_options=ReexecutionOptions.from_failure(failed.run_id, instance), raise_on_error=False)
        assert again.success
        ran = {e.step_key for e in _step_starts(instance, again.run_id)}
    (chain,) = [k for k in ran if k.startswith(TASK_STEP)]
    assert ran == {chain, "fhir_extract.merge_extract"}
    _assert_as_one_process_writes(part_export, tmp_path / "out" / PARTITION, site, secret, tmp_path)
    assert _staging_folders(tmp_path / "out") == []
