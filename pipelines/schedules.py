"""Nightly run: at 02:00 (partition timezone) materialise yesterday's partition."""

from __future__ import annotations

from dagster import DefaultScheduleStatus, build_schedule_from_partitioned_job

from pipelines.jobs import daily_outcomes_job

nightly_outcomes_schedule = build_schedule_from_partitioned_job(
    daily_outcomes_job,
    name="nightly_outcomes",
    hour_of_day=2,
    minute_of_hour=0,
    default_status=DefaultScheduleStatus.STOPPED,  # a site turns it on once its paths are set
    description="Every night at 02:00, run the export of the day that just ended.",
)
