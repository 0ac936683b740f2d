"""The code location loads, and holds what a site relies on: assets, blocking checks, job, schedule, sensor."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

from dagster import AssetCheckKey, AssetKey, DailyPartitionsDefinition, Definitions

from pipelines.definitions import defs
from qis_fhir.mapping.yamldoc import read_yaml

REPO = Path(__file__).resolve().parents[2]  # not "from conftest": several test folders have one

TABLES = {"fhir_patients", "fhir_conditions", "fhir_medication_requests", "fhir_observations", "fhir_encounters"}
ASSETS = {"fhir_export", "mapping_set", *TABLES, "outcome_events", "outcome_packets", "published_packets", "secure_rounds",
          "evidence_tables", "outcome_events_table", "pooled_outcomes_table"}


def test_every_definition_loads():
    Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == ASSETS
    assert repo.get_job("daily_outcomes") is not None
    assert {s.name for s in repo.schedule_defs} == {"nightly_outcomes"}
    assert {s.name for s in repo.sensor_defs} == {"new_export_sensor", "run_failure_alert_sensor"}
    assert {"site", "dht", "warehouse"} <= set(repo.get_top_level_resources())


def test_assets_share_daily_partitions_and_lineage():
    graph = defs.get_repository_def().asset_graph
    for name in ASSETS:
        assert isinstance(graph.get(AssetKey(name)).partitions_def, DailyPartitionsDefinition)
    # the export is a source the UI observes; each resource type's table is drawn from it and from the
    # mapping set whose suites check it, and the events from every table and the mapping
    assert graph.get(AssetKey("fhir_export")).is_observable and not graph.get(AssetKey("fhir_export")).is_materializable
    for table in TABLES:
        assert graph.get(AssetKey(table)).parent_keys == {AssetKey("fhir_export"), AssetKey("mapping_set")}
    assert graph.get(AssetKey("outcome_events")).parent_keys == {*map(AssetKey, TABLES), AssetKey("mapping_set")}
    chain = ["outcome_events", "outcome_packets", "published_packets"]
    for parent, child in zip(chain, chain[1:]):
        assert graph.get(AssetKey(child)).parent_keys == {AssetKey(parent)}
    # the secure rounds follow the packets (clear cells stay out of masked sums); the evidence pools both
    assert graph.get(AssetKey("secure_rounds")).parent_keys == {AssetKey("outcome_packets")}
    assert graph.get(AssetKey("evidence_tables")).parent_keys == {AssetKey("published_packets"), AssetKey("secure_rounds")}
    # the database tables are drawn from the assets whose files they copy
    assert graph.get(AssetKey("outcome_events_table")).parent_keys == {AssetKey("outcome_events")}
    assert graph.get(AssetKey("pooled_outcomes_table")).parent_keys == {AssetKey("evidence_tables")}


def test_publish_is_retried_and_the_nightly_job_runs_the_whole_chain():
    from pipelines.assets.network import PUBLISH_RETRY

    repo = defs.get_repository_def()
    for name in ("published_packets", "secure_rounds"):  # both reach the DHT: a node restarting heals within minutes
        assert repo.assets_defs_by_key[AssetKey(name)].op.retry_policy == PUBLISH_RETRY
    job = repo.get_job("daily_outcomes")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == ASSETS


def test_quality_suites_are_blocking_checks_on_their_assets():
    graph = defs.get_repository_def().asset_graph
    checks = {k: graph.get_check_spec(k) for k in graph.asset_check_keys}
    expected = {
        AssetCheckKey(AssetKey(f"fhir_{t}"), n)
        for t in ["patients", "conditions", "medication_requests", "observations", "encounters"]
        for n in ["every_line_accounted_for", f"{t}_quality"]
    } | {AssetCheckKey(AssetKey("outcome_events"), "outcome_events_quality")}
    assert set(checks) == expected
    assert all(spec.blocking for spec in checks.values())
    # a suite comes from the mapping set: the UI's lineage shows each quality check reading it
    for key, spec in checks.items():
        if key.name.endswith("_quality"):
            assert [d.asset_key for d in spec.additional_deps] == [AssetKey("mapping_set")]


def test_nightly_schedule_runs_yesterday_at_two():
    from datetime import datetime

    from dagster import build_schedule_context

    (schedule,) = defs.get_repository_def().schedule_defs
    assert schedule.cron_schedule == "0 2 * * *"
    when = datetime(2026, 3, 5, 2, 0, tzinfo=UTC)
    with build_schedule_context(scheduled_execution_time=when) as ctx:
        (request,) = schedule.evaluate_tick(ctx).run_requests
    assert request.partition_key == "2026-03-04"


def test_instance_template_turns_telemetry_off():
    config = read_yaml(REPO / "pipelines" / "dagster.yaml").data
    assert config["telemetry"]["enabled"] is False


def test_no_dagster_import_in_the_library():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "qis_fhir").rglob("*.py")
        if any(line.lstrip().startswith(("import dagster", "from dagster")) for line in p.read_text().splitlines())
    ]
    assert offenders == []



def _instance_settings(home: Path) -> tuple[bool, bool]:
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        return instance.telemetry_enabled, instance.nux_enabled


def test_the_shipped_instance_settings_turn_telemetry_and_the_signup_prompt_off(tmp_path):
    """Both the dagster.yaml an operator copies (and `python -m pipelines.dev` installs) and the one `.ci/run`
    writes: Dagster's defaults are on for both, so an instance without them reports to the vendor."""
    import subprocess

    from pipelines.dev import prepare_home

    assert _instance_settings(prepare_home(tmp_path / "shipped")) == (False, False)
    (tmp_path / "default").mkdir()
    assert _instance_settings(tmp_path / "default") == (True, True)  # what the files change
    (line,) = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("printf") and "dagster.yaml" in line]
    ci = tmp_path / "ci"
    ci.mkdir()
    subprocess.run(["bash", "-c", line], env={"DAGSTER_HOME": str(ci), "PATH": "/usr/bin:/bin"}, check=True)
    assert _instance_settings(ci) == (False, False)


def test_every_job_runs_in_process_by_default_including_materialize_all():
    repo = defs.get_repository_def()
    implicit = defs.resolve_implicit_global_asset_job_def()
    assert implicit.executor_def.name == "in_process"  # the UI's "Materialize all" runs this job
    assert {job.name: job.executor_def.name for job in repo.get_all_jobs()} == {job.name: "in_process" for job in repo.get_all_jobs()}


def test_the_code_location_is_named_qis_fhir():
    """`python -m pipelines.dev` starts `dagster dev` in the checkout without -m, so the location comes
    from [tool.dagster] in pyproject.toml."""
    from dagster._core.workspace.load_target import PyProjectFileTarget

    (origin,) = PyProjectFileTarget(str(REPO / "pyproject.toml")).create_origins()
    assert origin.location_name == "qis_fhir"
    from dagster._cli.utils import has_pyproject_dagster_block

    from pipelines.dev import dev_command

    # no target given, in the checkout: dagster loads the location from pyproject.toml
    assert not {"-m", "-f", "-w", "--module-name"} & set(dev_command("127.0.0.1", 3000))
    assert has_pyproject_dagster_block(str(REPO / "pyproject.toml"))
