"""Materialise the assets up to the events in process on a real Synthea export; a failed quality check
blocks downstream. (Packets, publishing and evidence: tests/pipelines/test_stages.py.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from dagster import AssetKey, AssetSelection, Definitions, define_asset_job, materialize

from pipelines.assets import ALL_CHECKS, fhir_export, fhir_extract, mapping_set, outcome_events
from pipelines.assets.checks import check_name
from pipelines.assets.extract import TABLE_ASSETS, TYPE_OF_TABLE, table_asset
from pipelines.assets.metadata import column_schema
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.fhir import TABLE_NAMES
from qis_fhir.outcomes.events import EVENT_COLUMNS

REPO = Path(__file__).resolve().parents[2]  # not "from conftest": several test folders have one

PARTITION = "2026-11-27"
THROUGH_EVENTS = [fhir_export, mapping_set, fhir_extract, outcome_events, *ALL_CHECKS]  # what a site without keys for a network can run


def _run_check_alone(table: str, site: SiteConfig, instance):
    """Execute the one quality check of ``table`` for PARTITION, nothing else (the UI's "Execute")."""
    check = next(c for c in ALL_CHECKS if c.check_key.name == check_name(table))
    job = define_asset_job("one_check", selection=AssetSelection.checks(check), partitions_def=daily_exports)
    defs = Definitions(assets=THROUGH_EVENTS[:4], asset_checks=ALL_CHECKS, jobs=[job], resources={"site": site})
    # the partition as a run tag, as the UI launches it (execute_in_process(partition_key=...) wants a
    # selected asset to take the partitions from; a check-only selection has none)
    result = defs.resolve_job_def("one_check").execute_in_process(tags={"dagster/partition": PARTITION}, instance=instance, raise_on_error=False)
    assert _materialized_assets(result) == {}  # no asset ran: the check read the partition's report
    return _checks(result)


def _site(export_dir: Path, tmp_path: Path, mapping_dir: Path | None = None) -> SiteConfig:
    return SiteConfig(
        export_dir=str(export_dir),
        out_root=str(tmp_path / "out"),
        site_secret_path=str(tmp_path / "site.secret"),
        mapping_dir=str(mapping_dir) if mapping_dir else None,
    )


def _checks(result) -> dict[tuple[str, str], bool]:
    """(asset, check) -> passed: each extract table has its own ``every_line_accounted_for``."""
    return {
        (e.asset_check_evaluation_data.asset_key.to_user_string(), e.asset_check_evaluation_data.check_name): e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }



def _observations(result) -> dict[str, dict]:
    return {
        e.event_specific_data.asset_observation.asset_key.to_user_string(): e.event_specific_data.asset_observation
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    }


def _materialized_assets(result) -> dict[str, dict]:
    return {
        e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }


def test_all_assets_materialise_on_synthea_fixture(fixtures_dir, tmp_path, instance):
    site = _site(fixtures_dir / "synthea-r4-105", tmp_path)
    # the export's observation runs too, as in the nightly job (``materialize`` alone leaves sources out)
    result = materialize(THROUGH_EVENTS, selection=AssetSelection.all(include_sources=True), partition_key=PARTITION,
                         resources={"site": site}, instance=instance)
    assert result.success

    mats = _materialized_assets(result)
    assert set(mats) == {"mapping_set", *TABLE_ASSETS, "outcome_events"}
    assert mats["mapping_set"]["version"].value == "v2"  # the default set, no QIS_MAPPING_DIR
    # the export was observed before it was read: its files by resource type, complete (the fixture is old)
    export = fixtures_dir / "synthea-r4-105"
    observed = _observations(result)["fhir_export"]
    assert observed.partition == PARTITION
    assert observed.metadata["completion"].value == "complete"
    files = [p for p in export.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert observed.metadata["files"].value == len(files)
    assert observed.metadata["bytes"].value == sum(p.stat().st_size for p in files)
    assert observed.metadata["files_by_type"].value["Observation"] >= 1
    # each resource type's table: its rows, and its lines read = accepted + quarantined, as summary.json counts them
    by_type = json.loads((tmp_path / "out" / PARTITION / "extract" / "summary.json").read_text())["by_type"]
    for table, rtype in TYPE_OF_TABLE.items():
        meta = mats[table_asset(table)]
        assert meta["dagster/row_count"].value == len(pd.read_parquet(tmp_path / "out" / PARTITION / "extract" / f"{table}.parquet")), table
        assert {k: meta[k].value for k in ("read", "accepted", "quarantined")} == by_type.get(rtype, {"read": 0, "accepted": 0, "quarantined": 0})
    assert mats["fhir_observations"]["dagster/row_count"].value > 10_000
    totals = mats["fhir_patients"]["export_totals"].value
    assert totals["read"] == totals["accepted"] + totals["quarantined"] + totals["skipped"]
    events = mats["outcome_events"]["events"].value
    assert events > 0

    checks = _checks(result)
    # on each table its line counts and its suite, on the events theirs
    assert set(checks) == {*((table_asset(t), c) for t in TABLE_NAMES for c in ("every_line_accounted_for", f"{t}_quality")),
                           ("outcome_events", "outcome_events_quality")}
    assert all(checks.values()), checks
    # one check on its own, for this partition, after the materialisation
    assert _run_check_alone("observations", site, instance) == {("fhir_observations", "observations_quality"): True}

    out = tmp_path / "out" / PARTITION
    # the column schemas the UI shows are the Parquet files' columns, in order
    for table in TABLE_NAMES:
        shown = fhir_extract.specs_by_key[AssetKey(table_asset(table))].metadata["dagster/column_schema"]
        written = column_schema(pq.read_schema(out / "extract" / f"{table}.parquet"))
        assert [(c.name, c.type) for c in shown.columns] == [(c.name, c.type) for c in written.columns]
    events_schema = [c.name for c in mats["outcome_events"]["dagster/column_schema"].value.columns]
    assert events_schema == list(pq.read_schema(out / "outcome_events.parquet").names) == EVENT_COLUMNS
    for name in ["extract/summary.json", "quarantine.ndjson", "outcome_events.parquet", "outcome_summary.json",
                 "quality/extract.json", "quality/outcome_events.json"]:
        assert (out / name).exists(), name
    assert len(pd.read_parquet(out / "outcome_events.parquet")) == events
    assert json.loads((out / "outcome_summary.json").read_text())["totals"]["events"] == events
    # the partition's events are recorded in the instance, for lineage in the UI
    record = instance.get_latest_materialization_event(AssetKey("outcome_events"))
    assert record is not None and record.dagster_event.partition == PARTITION

    # the partition folder is a run folder: complete, with every asset's stage
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["stages"] == ["extract", "outcomes", "quality"]
    # a re-materialisation that fails (its export folder is gone) leaves the partition as it was
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    gone = _site(tmp_path / "no-such-export", tmp_path)
    failed = materialize(THROUGH_EVENTS, partition_key=PARTITION, resources={"site": gone}, instance=instance, raise_on_error=False)
    assert not failed.success
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    attempt = json.loads((tmp_path / "out" / f"{PARTITION}.partial" / "run.json").read_text())
    assert (attempt["status"], attempt["error"]["stage"], attempt["error"]["exit_code"]) == ("failed", "extract", 3)


def test_failing_quality_check_blocks_downstream_asset(fixtures_dir, tmp_path, instance):
    mapping_dir = tmp_path / "mappings" / "v1"  # the loader insists the folder is named after the version
    shutil.copytree(REPO / "mappings" / "v1", mapping_dir)
    suites = mapping_dir / "quality.yaml"
    # a rule the real data breaks: this export has male patients too
    suites.write_text(
        suites.read_text().replace(
            "- in_set: {column: sex, values: [female, male, other, unknown]}",
            "- in_set: {column: sex, values: [female]}",
        )
    )
    site = _site(fixtures_dir / "synthea-r4-105", tmp_path, mapping_dir)
    result = materialize(
        THROUGH_EVENTS, partition_key=PARTITION, resources={"site": site}, instance=instance, raise_on_error=False
    )
    assert not result.success
    checks = _checks(result)
    assert checks[("fhir_patients", "patients_quality")] is False
    assert checks[("fhir_conditions", "conditions_quality")] is True
    mats = _materialized_assets(result)
    assert set(TABLE_ASSETS) <= set(mats)  # the extract itself is kept, for inspection
    assert "outcome_events" not in mats  # ...but nothing downstream of a failed suite runs
    assert not (tmp_path / "out" / PARTITION / "outcome_events.parquet").exists()
    report = json.loads((tmp_path / "out" / PARTITION / "quality" / "extract.json").read_text())
    assert report["tables"]["patients"]["success"] is False
    # blocking: Dagster never started the downstream step (the library would refuse it too)
    assert "outcome_events" not in {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    # the failed check executed on its own for this partition fails again; a passing one passes
    assert _run_check_alone("patients", site, instance) == {("fhir_patients", "patients_quality"): False}
    # ...saying which rule failed, where it is written and what was counted (no cell value)
    failures = next(e.asset_check_evaluation_data.metadata["failures"].value for e in result.all_events
                    if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.asset_check_evaluation_data.check_name == "patients_quality")
    assert re.fullmatch(r"- quality\.yaml:\d+ in_set on sex: observed \d+ of \d+ rows unexpected.*; expected .*", failures)
    assert _run_check_alone("conditions", site, instance) == {("fhir_conditions", "conditions_quality"): True}


def test_missing_export_folder_fails_the_extract(tmp_path, instance):
    site = SiteConfig(export_root=str(tmp_path / "exports"), out_root=str(tmp_path / "out"),
                      site_secret_path=str(tmp_path / "site.secret"))
    result = materialize(
        THROUGH_EVENTS, partition_key=PARTITION, resources={"site": site}, instance=instance, raise_on_error=False
    )
    assert not result.success
    assert "outcome_events" not in _materialized_assets(result)


def test_a_check_of_a_partition_never_materialised_fails_saying_so(tmp_path, instance):
    site = _site(tmp_path / "export", tmp_path)
    assert _run_check_alone("patients", site, instance) == {}  # no verdict: the check step itself failed
    failure = next(e for e in instance.all_logs(instance.get_runs(limit=1)[0].run_id) if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE")
    cause = failure.dagster_event.step_failure_data.error.cause
    assert cause.cls_name == "QualityError" and "the extract tables of this partition were never checked" in cause.message
