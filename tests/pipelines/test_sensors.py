"""The new-export sensor: requests each new, complete dated folder once, in order, a bounded number per tick."""

from __future__ import annotations

import os
import time
from datetime import date, timedelta

from dagster import RunRequest, SkipReason, build_sensor_context

from pipelines.resources import SiteConfig
from pipelines.sensors import LATE_DAYS, ExportCursor, new_export_sensor, scan_exports

OLD = time.time() - 3600


def _export(root, name, age=OLD):
    folder = root / name
    folder.mkdir(parents=True)
    f = folder / "Patient.000.ndjson"
    f.write_text("{}\n")
    os.utime(f, (age, age))
    return folder


def test_scan_orders_filters_and_uses_the_cursor(tmp_path):
    for name in ["2026-01-03", "2026-01-01", "2026-01-02", "not-a-date", "2026-1-4"]:
        _export(tmp_path, name)
    (tmp_path / "2026-01-05.ndjson").write_text("")  # a file, not a folder
    assert scan_exports(tmp_path, None).ready == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert scan_exports(tmp_path, "2026-01-01").ready == ["2026-01-02", "2026-01-03"]
    assert scan_exports(tmp_path, "2026-01-03").ready == []
    assert scan_exports(tmp_path, None, limit=2).ready == ["2026-01-01", "2026-01-02"]
    assert scan_exports(tmp_path, None, valid_keys={"2026-01-02"}).ready == ["2026-01-02"]


def test_scan_waits_for_a_folder_still_being_written(tmp_path):
    _export(tmp_path, "2026-01-01")
    _export(tmp_path, "2026-01-02", age=time.time())  # written a moment ago
    _export(tmp_path, "2026-01-03")
    (tmp_path / "2026-01-04").mkdir()  # empty: the export has not started writing
    scan = scan_exports(tmp_path, None, quiet_seconds=300)
    assert scan.ready == ["2026-01-01"]  # 01-03 waits behind 01-02 so partitions run in order
    assert scan.waiting == ["2026-01-02"]


def test_scan_of_missing_root_is_empty(tmp_path):
    assert scan_exports(tmp_path / "nope", None).ready == []


def test_sensor_requests_partitions_and_advances_cursor(tmp_path):
    for name in ["2026-02-01", "2026-02-02"]:
        _export(tmp_path, name)
    site = SiteConfig(export_root=str(tmp_path), out_root=str(tmp_path / "out"))
    with build_sensor_context(resources={"site": site}) as ctx:
        result = new_export_sensor(ctx)
    requests = result.run_requests
    assert [r.partition_key for r in requests] == ["2026-02-01", "2026-02-02"]
    assert all(isinstance(r, RunRequest) and r.run_key == r.partition_key for r in requests)

    with build_sensor_context(resources={"site": site}, cursor=result.cursor) as ctx:
        again = new_export_sensor(ctx)
    assert isinstance(again, SkipReason)


def _tick(site, cursor):
    with build_sensor_context(resources={"site": site}, cursor=cursor) as ctx:
        return new_export_sensor(ctx)


def test_sensor_picks_up_a_late_folder_dated_before_its_cursor(tmp_path):
    site = SiteConfig(export_root=str(tmp_path), out_root=str(tmp_path / "out"))
    for name in ["2026-02-01", "2026-02-03"]:
        _export(tmp_path, name)
    first = _tick(site, None)
    assert [r.partition_key for r in first.run_requests] == ["2026-02-01", "2026-02-03"]

    late = _export(tmp_path, "2026-02-02", age=time.time())  # the copy of 02-02 arrives after 02-03's
    assert isinstance(_tick(site, first.cursor), SkipReason)  # still being written: not yet
    for f in late.iterdir():
        os.utime(f, (OLD, OLD))
    second = _tick(site, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["2026-02-02"]
    assert [r.run_key for r in second.run_requests] == ["2026-02-02"]
    assert isinstance(_tick(site, second.cursor), SkipReason)  # and only once


def test_cursor_of_the_earlier_format_requests_nothing_up_to_it(tmp_path):
    for name in ["2026-01-30", "2026-02-01", "2026-02-02", "2026-02-03"]:
        _export(tmp_path, name)
    cursor = ExportCursor.parse("2026-02-02")  # what the sensor stored before it kept a window
    assert scan_exports(tmp_path, cursor).ready == ["2026-02-03"]
    after = ExportCursor.parse(cursor.advance(["2026-02-03"]).dumps())
    assert scan_exports(tmp_path, after).ready == []


def test_cursor_window_is_bounded_and_older_late_folders_are_left_to_a_backfill(tmp_path):
    cursor = ExportCursor()
    for day in range(100):
        cursor = cursor.advance([(date(2026, 1, 1) + timedelta(days=day)).isoformat()])
    assert cursor.newest == "2026-04-10"
    assert len(cursor.requested) == LATE_DAYS + 1
    _export(tmp_path, "2026-03-10")  # LATE_DAYS before the newest: still picked up
    _export(tmp_path, "2026-03-09")  # older: a backfill's job (docs/dagster.md)
    cursor = ExportCursor(cursor.newest, cursor.requested - {"2026-03-10"})
    assert scan_exports(tmp_path, cursor.dumps()).ready == ["2026-03-10"]


def test_sensor_skips_with_a_fixed_export_dir(tmp_path):
    site = SiteConfig(export_dir=str(tmp_path), out_root=str(tmp_path / "out"))
    with build_sensor_context(resources={"site": site}) as ctx:
        assert isinstance(new_export_sensor(ctx), SkipReason)
