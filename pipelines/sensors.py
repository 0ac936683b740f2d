"""Notice new export folders under ``export_root`` and request their partitions; alert on failed runs.

Bulk-export clients write a folder per night (``<export_root>/<YYYY-MM-DD>/``); the sensor requests
each new folder's partition once (the run key is the folder name) and waits until a folder has been
quiet for a while (``qis_fhir.exportstate``, the rule the export's observation shows) so it never starts on a half-written export. Its cursor remembers the newest folder
requested and every folder requested in the ``LATE_DAYS`` before it, so a folder that arrives late,
dated before one already requested, is still picked up (once) while it is within that window. Every
tick is bounded: at most ``MAX_ENTRIES`` directory entries looked at and ``MAX_REQUESTS`` runs requested.
"""

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from dagster import (
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from pipelines.jobs import daily_outcomes_job
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from qis_fhir.exportstate import COMPLETE, MAX_ENTRIES, QUIET_SECONDS, completion, newest_change

DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_REQUESTS = 7  # runs requested per tick; a backlog drains over following ticks
LATE_DAYS = 31  # a folder dated up to this many days before the newest requested one is still picked up


def _window_start(newest: str) -> str:
    return (date.fromisoformat(newest) - timedelta(days=LATE_DAYS)).isoformat()


@dataclass(frozen=True)
class ExportCursor:
    """What the sensor has requested: the newest folder, and every folder in the ``LATE_DAYS`` before it.

    Stored as JSON; at most ``LATE_DAYS + 1`` names for daily folders. A cursor of the earlier format
    (just the newest folder's name) becomes the ``floor``: nothing up to it is requested again.
    """

    newest: str | None = None
    requested: frozenset[str] = frozenset()
    floor: str | None = None  # folders up to here count as requested (a cursor of the earlier format)

    @classmethod
    def parse(cls, text: str | None) -> "ExportCursor":
        if not text:
            return cls()
        if DATE_FOLDER.match(text):
            return cls(newest=text, floor=text)
        data = json.loads(text)
        return cls(data["newest"], frozenset(data["requested"]), data.get("floor"))

    def is_new(self, name: str) -> bool:
        if self.floor is not None and name <= self.floor:
            return False
        return name not in self.requested and (self.newest is None or name >= _window_start(self.newest))

    def advance(self, names: list[str]) -> "ExportCursor":
        newest = max(n for n in [self.newest, *names] if n is not None)
        start = _window_start(newest)
        requested = frozenset(n for n in self.requested | set(names) if n >= start)
        floor = self.floor if self.floor is not None and self.floor >= start else None
        return ExportCursor(newest, requested, floor)

    def dumps(self) -> str:
        return json.dumps({"newest": self.newest, "requested": sorted(self.requested), "floor": self.floor}, sort_keys=True)


@dataclass(frozen=True)
class ExportScan:
    ready: list[str]  # folder names to request, oldest first, at most ``limit``
    waiting: list[str]  # new folders not quiet (or empty) yet


def scan_exports(
    root: Path,
    cursor: ExportCursor | str | None,
    *,
    valid_keys: set[str] | None = None,
    now: float | None = None,
    quiet_seconds: float = QUIET_SECONDS,
    limit: int = MAX_REQUESTS,
    max_entries: int = MAX_ENTRIES,
) -> ExportScan:
    """Date folders under ``root`` not yet requested by ``cursor`` that are complete enough to run."""
    now = time.time() if now is None else now
    if not isinstance(cursor, ExportCursor):
        cursor = ExportCursor.parse(cursor)
    if not root.is_dir():
        return ExportScan([], [])
    names: list[str] = []
    seen = 0
    with os.scandir(root) as it:
        for entry in it:
            seen += 1
            if seen > max_entries:
                break
            if entry.is_dir() and DATE_FOLDER.match(entry.name) and cursor.is_new(entry.name):
                if valid_keys is None or entry.name in valid_keys:
                    names.append(entry.name)
    ready: list[str] = []
    waiting: list[str] = []
    for name in sorted(names):
        if completion(newest_change(root / name, max_entries), now, quiet_seconds) != COMPLETE:
            waiting.append(name)
            break  # keep partitions in order: a later folder waits for an earlier one
        ready.append(name)
        if len(ready) >= limit:
            break
    return ExportScan(ready, waiting)


@sensor(
    job=daily_outcomes_job,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.STOPPED,
    description="Requests the partition of each new, quiet <YYYY-MM-DD> folder under export_root.",
)
def new_export_sensor(context: SensorEvaluationContext, site: SiteConfig):
    if site.export_dir:
        return SkipReason("export_dir is fixed (QIS_EXPORT_DIR): there are no dated folders to watch")
    root = Path(site.export_root)
    valid = set(daily_exports.get_partition_keys())
    cursor = ExportCursor.parse(context.cursor)
    scan = scan_exports(root, cursor, valid_keys=valid)
    if not scan.ready:
        why = f"waiting for {scan.waiting[0]} to be complete" if scan.waiting else f"no new export folder in {root}"
        return SkipReason(why)
    return SensorResult(
        run_requests=[RunRequest(run_key=name, partition_key=name) for name in scan.ready],
        cursor=cursor.advance(scan.ready).dumps(),
    )


def _raised_error(error):
    """The exception the step's code raised: Dagster wraps it in its own errors (``Dagster...``), so
    the first cause that is not one of those (a ``QisError`` raised ``from`` an ``OSError`` stays the
    ``QisError``)."""
    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    return error


def _message_text(error) -> str | None:
    """The exception's own message: Dagster stores ``module.Class: message``."""
    if error is None:
        return None
    return error.message.split(f"{error.cls_name}: ", 1)[-1]


@run_failure_sensor(
    default_status=DefaultSensorStatus.RUNNING,
    description="Writes <out_root>/alerts/<time>-<run_id>.json, logs one ERROR line and POSTs the JSON to "
    "QIS_ALERT_WEBHOOK (if set) for every failed run of this code location.",
)
def run_failure_alert_sensor(context: RunFailureSensorContext, site: SiteConfig):
    from qis_fhir.alerts import build_alert, raise_alert

    run = context.dagster_run
    steps = context.get_step_failure_events()
    failure = steps[0] if steps else context.failure_event
    error = _raised_error(getattr(failure.event_specific_data, "error", None))
    alert = build_alert(
        job=run.job_name,
        run_id=run.run_id,
        partition=run.tags.get("dagster/partition"),
        step=failure.step_key,
        error_class=error.cls_name if error is not None else None,
        error_message=_message_text(error),  # kept for a QisError only
    )
    raise_alert(alert, Path(site.out_root), webhook_url=site.alert_webhook, logger=context.log)
