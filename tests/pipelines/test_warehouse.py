"""The site's outcome events land in its database (DuckDB by default) through the ``warehouse`` IO
manager, queryable with SQL, one partition replaced (never duplicated) by a re-run. The pooled table's
rows are queried from the database in tests/pipelines/test_stages.py (the whole graph against a DHT)."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from dagster import materialize

from pipelines.assets import fhir_extract, mapping_set, outcome_events, outcome_events_table
from pipelines.resources import SiteConfig
from pipelines.warehouse import DATABASE_FILE, SCHEMA, duckdb_warehouse, warehouse_from_env

DAY, NEXT_DAY = "2026-11-27", "2026-11-28"
THROUGH_TABLE = [mapping_set, fhir_extract, outcome_events, outcome_events_table]  # no DHT, no site keys needed


def _by_partition(database, table: str) -> dict[str, tuple]:
    """Rows, events and two column sums per partition day, as an analyst's SQL sees them."""
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(
            f"select strftime(partition_date, '%Y-%m-%d'), count(*), count(distinct event_id), "
            f"sum(baseline_value), sum(followup_value) from {SCHEMA}.{table} group by 1"
        ).fetchall()
    return {day: tuple(rest) for day, *rest in rows}


def _parquet_figures(path) -> tuple:
    events = pd.read_parquet(path)
    return len(events), events["event_id"].nunique(), events["baseline_value"].sum(), events["followup_value"].sum()


def test_outcome_events_are_queryable_with_sql_and_a_rerun_replaces_its_day(fixtures_dir, tmp_path, instance):
    out = tmp_path / "out"
    site = SiteConfig(export_dir=str(fixtures_dir / "synthea-r4-105"), out_root=str(out), site_secret_path=str(tmp_path / "site.secret"))
    resources = {"site": site, "warehouse": warehouse_from_env({"QIS_OUT_ROOT": str(out)})}  # as the code location binds it
    assert materialize(THROUGH_TABLE, partition_key=DAY, resources=resources, instance=instance).success

    database = out / DATABASE_FILE
    expected = _parquet_figures(out / DAY / "outcome_events.parquet")
    assert expected[0] > 0
    got = _by_partition(database, "outcome_events_table")
    assert set(got) == {DAY}
    rows, distinct, baseline, followup = got[DAY]
    assert (rows, distinct) == expected[:2]
    assert baseline == pytest.approx(expected[2], rel=1e-12) and followup == pytest.approx(expected[3], rel=1e-12)
    with duckdb.connect(str(database), read_only=True) as con:
        columns = [c[0] for c in con.execute(f"describe {SCHEMA}.outcome_events_table").fetchall()]
    assert columns == [*pd.read_parquet(out / DAY / "outcome_events.parquet").columns, "partition_date"]

    # the same day again (the table alone, then the whole selection): its rows are replaced, not added
    assert materialize([outcome_events_table], partition_key=DAY, resources=resources, instance=instance).success
    assert _by_partition(database, "outcome_events_table") == got
    assert materialize(THROUGH_TABLE, partition_key=DAY, resources=resources, instance=instance).success
    assert _by_partition(database, "outcome_events_table") == got

    # another day adds its own rows and leaves the first day's alone
    assert materialize(THROUGH_TABLE, partition_key=NEXT_DAY, resources=resources, instance=instance).success
    both = _by_partition(database, "outcome_events_table")
    assert set(both) == {DAY, NEXT_DAY} and both[DAY] == got[DAY] and both[NEXT_DAY][0] == expected[0]


def test_a_day_without_checked_events_puts_nothing_in_the_database(tmp_path, instance):
    """The table reads only a finished run folder: a day never extracted fails with a clear message."""
    out = tmp_path / "out"
    out.mkdir()
    (out / DAY).mkdir()  # a folder, but no run in it
    site = SiteConfig(export_dir=str(tmp_path / "none"), out_root=str(out), site_secret_path=str(tmp_path / "site.secret"))
    result = materialize([outcome_events_table], partition_key=DAY, resources={"site": site, "warehouse": duckdb_warehouse(out)},
                         instance=instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "is not a run folder: run the stages that write outcome_events.parquet first" in failure.event_specific_data.error.cause.message
    assert not (out / DATABASE_FILE).exists()

