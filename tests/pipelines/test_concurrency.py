"""The shipped instance settings queue a second run of one partition until the first has finished.

The nightly schedule, the export sensor and a backfill can each request the same day; the run queue's
tag limit on ``dagster/partition`` (``pipelines/dagster.yaml``) lets one run per day be in progress.
Checked with Dagster's own queue daemon deciding what to launch, on an instance made from that file."""

from __future__ import annotations

import logging

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from pipelines.dev import prepare_home
from pipelines.jobs import daily_outcomes_job
from pipelines.schedules import nightly_outcomes_schedule
from pipelines.sensors import new_export_sensor

PARTITION_TAG = "dagster/partition"
#: where queued runs come from: the qis_fhir location's repository (the queue needs an origin)
ORIGIN = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("qis_fhir"), "__repository__").get_job_origin(daily_outcomes_job.name)


@pytest.fixture
def shipped(tmp_path):
    with DagsterInstance.from_config(str(prepare_home(tmp_path / "home"))) as instance:
        yield instance


def _dequeued(instance: DagsterInstance) -> set[str]:
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    daemon._logger = logging.getLogger("queue")  # the daemon controller sets it before the first iteration
    runs = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), fixed_iteration_time=None)
    return {run.tags[PARTITION_TAG] for run in runs}


def _run(instance: DagsterInstance, day: str, status: DagsterRunStatus):
    return create_run_for_test(instance, job_name=daily_outcomes_job.name, status=status, tags={PARTITION_TAG: day}, remote_job_origin=ORIGIN)


def test_a_second_run_of_a_day_waits_while_other_days_run(shipped):
    _run(shipped, "2026-11-27", DagsterRunStatus.STARTED)  # the sensor's run of the day is in progress
    _run(shipped, "2026-11-27", DagsterRunStatus.QUEUED)  # the schedule asks for the same day
    _run(shipped, "2026-11-26", DagsterRunStatus.QUEUED)  # a backfill of another day
    assert _dequeued(shipped) == {"2026-11-26"}


def test_the_queued_run_goes_once_the_first_has_finished(shipped):
    first = _run(shipped, "2026-11-27", DagsterRunStatus.STARTED)
    _run(shipped, "2026-11-27", DagsterRunStatus.QUEUED)
    assert _dequeued(shipped) == set()
    shipped.report_run_failed(first)
    assert _dequeued(shipped) == {"2026-11-27"}


def test_the_schedule_and_the_sensor_request_runs_tagged_with_their_day(tmp_path):
    """The limit keys on ``dagster/partition``: both launchers' run requests resolve to that tag."""
    import os
    from datetime import UTC, datetime

    from dagster import build_schedule_context, build_sensor_context

    from pipelines.definitions import defs
    from pipelines.resources import SiteConfig

    def tags(request) -> dict:
        return request.with_resolved_tags_and_config(defs.resolve_job_def(daily_outcomes_job.name), [], None).tags

    with build_schedule_context(scheduled_execution_time=datetime(2026, 11, 28, 2, tzinfo=UTC)) as context:
        (scheduled,) = nightly_outcomes_schedule.evaluate_tick(context).run_requests
    (tmp_path / "exports" / "2026-11-27").mkdir(parents=True)
    (tmp_path / "exports" / "2026-11-27" / "Patient.000.ndjson").write_text("{}\n")
    os.utime(tmp_path / "exports" / "2026-11-27" / "Patient.000.ndjson", (0, 0))  # long quiet: complete
    site = SiteConfig(export_root=str(tmp_path / "exports"), out_root=str(tmp_path / "out"))
    with build_sensor_context(resources={"site": site}) as context:
        (sensed,) = new_export_sensor(context).run_requests
    assert tags(scheduled)[PARTITION_TAG] == tags(sensed)[PARTITION_TAG] == "2026-11-27"
