"""`qis-fhir run` and the Dagster assets run the same stage steps: same files, same events, same packets.

Also: the whole graph for two sites against DHT node processes on 127.0.0.1, ending with each site's
pooled table of both, in its run folder and its database; a DHT that does not answer fails the publish and the rounds assets under their retry policy and loses nothing;
a bad mapping or a failed quality suite publishes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dagster import RetryPolicy, materialize

from pipelines.assets import (
    ALL_ASSETS,
    evidence_tables,
    fhir_extract,
    mapping_set,
    outcome_events,
    outcome_packets,
)
from pipelines.assets.extract import TABLE_ASSETS
from pipelines.assets.metadata import PREVIEW_ROWS
from pipelines.assets.network import publish_asset
from pipelines.resources import DhtConfig, SiteConfig
from pipelines.warehouse import DATABASE_FILE, SCHEMA, duckdb_warehouse
from qis_fhir.dht.cluster import LOOPBACK, LocalCluster

REPO = Path(__file__).resolve().parents[2]  # not "from conftest": several test folders have one
PARTITION = "2026-11-27"
SEQ = 20261127  # `run --seq`: the day of the partition; its packets carry 2026112700 (revision 0)
UP_TO_PACKETS = [mapping_set, fhir_extract, outcome_events, outcome_packets]


@pytest.fixture(scope="module")
def site_world(tmp_path_factory):
    """A network of two member sites, each with a synthetic export big enough for publishable cells
    (the second, ``riverside``, only for the whole graph of two sites)."""
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.synth import generate_export

    root = tmp_path_factory.mktemp("world")
    create_network(root / "net", network_id="ours", min_cell_size=11)
    create_site("st-mary", root / "site")
    add_site(root / "net", root / "site")
    generate_export(root / "export", patients=1500, seed=3, truth_path=root / "truth.json")
    create_site("riverside", root / "riverside")
    add_site(root / "net", root / "riverside")
    generate_export(root / "export-riverside", patients=1500, seed=4, site_profile="urban", truth_path=root / "truth-riverside.json")
    return root


def _site_copy(world: Path, dest: Path, site: str = "site") -> Path:
    """The site's keys (same signing key, same patient-key secret) with its own release state."""
    shutil.copytree(world / site, dest)
    return dest


def _site(world: Path, tmp_path: Path, site_dir: Path, **extra) -> SiteConfig:
    return SiteConfig(export_dir=str(world / "export"), out_root=str(tmp_path / "dagster"), site_dir=str(site_dir),
                      network_dir=str(world / "net"), **extra)


def _events(result, kind: str) -> list:
    return [e for e in result.all_events if e.event_type_value == kind]


def _materialized(result) -> dict[str, dict]:
    return {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
            for e in _events(result, "ASSET_MATERIALIZATION")}


def _failure(result, step: str) -> str:
    """The one failure of ``step``: its error and the library's error under it, as the UI shows them."""
    (failure,) = [e for e in _events(result, "STEP_FAILURE") if e.step_key == step]
    error, text = failure.event_specific_data.error, []
    while error is not None:
        text.append(error.message)
        error = error.cause
    return "\n".join(text)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _timeless(value):
    """A report without its timings (``seconds``), which two runs never share."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def test_run_and_dagster_write_the_same_run(site_world, tmp_path, instance):
    from qis_fhir.pipeline import RunConfig, run_pipeline

    world = site_world
    cli = tmp_path / "cli"
    run_pipeline(RunConfig(export_dir=world / "export", out_dir=cli, site_dir=_site_copy(world, tmp_path / "site-cli"),
                           network_dir=world / "net", seq=SEQ))
    site = _site(world, tmp_path, _site_copy(world, tmp_path / "site-dagster"))
    result = materialize(UP_TO_PACKETS, partition_key=PARTITION, resources={"site": site}, instance=instance)
    assert result.success
    dag = tmp_path / "dagster" / PARTITION

    assert _files(cli) == _files(dag)  # one layout
    assert "quality/extract.json" in _files(cli) and "quality/outcome_events.json" in _files(cli)
    # same pseudonyms (one secret source: the site directory), same events
    cli_events, dag_events = pd.read_parquet(cli / "outcome_events.parquet"), pd.read_parquet(dag / "outcome_events.parquet")
    assert len(cli_events) > 0
    pd.testing.assert_frame_equal(cli_events, dag_events)
    for table in ("patients", "conditions", "medication_requests", "observations"):
        pd.testing.assert_frame_equal(pd.read_parquet(cli / "extract" / f"{table}.parquet"), pd.read_parquet(dag / "extract" / f"{table}.parquet"))
    # byte-identical packets: same events, same seq (the partition date), same key
    packets = (cli / "packets.ndjson").read_bytes()
    assert packets.count(b"\n") > 0 and packets == (dag / "packets.ndjson").read_bytes()
    assert _json(dag / "disclosure_report.json")["seq"] == SEQ * 100
    for name in ("disclosure_report.json", "outcome_summary.json", "quality/extract.json", "quality/outcome_events.json"):
        assert _timeless(_json(cli / name)) == _timeless(_json(dag / name)), name
    assert (cli / "quarantine.ndjson").read_bytes() == (dag / "quarantine.ndjson").read_bytes()
    assert _timeless(_json(cli / "extract" / "summary.json")) == _timeless(_json(dag / "extract" / "summary.json"))
    cli_run, dag_run = _json(cli / "run.json"), _json(dag / "run.json")
    assert cli_run["stages"] == dag_run["stages"] == ["extract", "outcomes", "quality", "packets"]
    assert cli_run["counts"] == dag_run["counts"]
    assert _materialized(result)["outcome_packets"]["dagster/row_count"].value == packets.count(b"\n")


def test_a_site_directory_and_a_secret_file_together_are_refused(site_world, tmp_path, instance):
    """Two secret sources would give one site's patients two pseudonym sets: refused before any file is written."""
    site = _site(site_world, tmp_path, site_world / "site", site_secret_path=str(tmp_path / "other.secret"))
    result = materialize(UP_TO_PACKETS, partition_key=PARTITION, resources={"site": site}, instance=instance, raise_on_error=False)
    assert not result.success
    assert "two secrets would give its patients two pseudonym sets" in _failure(result, "fhir_extract.plan_extract")
    assert not (tmp_path / "dagster").exists() and not (tmp_path / "other.secret").exists()


def test_a_failed_suite_or_a_bad_mapping_publishes_nothing(site_world, tmp_path, instance):
    world = site_world
    mapping_dir = tmp_path / "mappings" / "v1"  # the loader insists the folder is named after the version
    shutil.copytree(REPO / "mappings" / "v1", mapping_dir)
    suites = mapping_dir / "quality.yaml"
    suites.write_text(suites.read_text().replace("- in_set: {column: sex, values: [female, male, other, unknown]}",
                                                 "- in_set: {column: sex, values: [female]}"))
    dht = DhtConfig(bootstrap=f"{LOOPBACK}:9", bind=LOOPBACK)  # never reached: nothing may get that far
    site = _site(world, tmp_path, _site_copy(world, tmp_path / "site"), mapping_dir=str(mapping_dir))
    resources = {"site": site, "dht": dht, "warehouse": duckdb_warehouse(tmp_path / "dagster")}
    failed = materialize(ALL_ASSETS, partition_key=PARTITION, resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success
    assert set(_materialized(failed)) == {"mapping_set", *TABLE_ASSETS}  # the extract is kept, for inspection
    out = tmp_path / "dagster" / PARTITION
    assert _json(out / "run.json")["stages"] == ["extract"]
    assert not (out / "packets.ndjson").exists() and not (out / "publish_report.json").exists()
    assert not (tmp_path / "dagster" / DATABASE_FILE).exists()  # nor does the site's database receive anything

    # materialising a later asset on its own does not get round the failed suite
    alone = materialize([outcome_events], partition_key=PARTITION, resources={"site": site}, instance=instance, raise_on_error=False)
    assert not alone.success
    assert "the extract tables failed their quality suites" in _failure(alone, "outcome_events")
    assert not (out / "outcome_events.parquet").exists()

    # `qis-fhir run` stops at the same point: the failed extract's report is kept, nothing is derived from it
    from qis_fhir.errors import QualityError
    from qis_fhir.pipeline import RunConfig, run_pipeline

    with pytest.raises(QualityError, match="table patients"):
        run_pipeline(RunConfig(export_dir=world / "export", out_dir=tmp_path / "cli", mapping_dir=mapping_dir,
                               site_dir=tmp_path / "site", network_dir=world / "net"))
    partial = tmp_path / "cli.partial"
    error = _json(partial / "run.json")["error"]
    assert (error["stage"], error["exit_code"]) == ("quality", 5)
    assert _files(partial) == _files(out)  # the same files as the failed partition: no events
    assert not (tmp_path / "cli").exists()

    (mapping_dir / "conditions.yaml").write_text("buckets: [not, a, mapping\n")
    bad = materialize(ALL_ASSETS, partition_key="2026-11-28", resources=resources, instance=instance, raise_on_error=False)
    assert not bad.success and _materialized(bad) == {}
    assert not (tmp_path / "dagster" / "2026-11-28").exists()


def test_the_whole_graph_for_two_sites_against_a_local_dht(site_world, tmp_path, instance):
    """Each site's nightly job (what the schedule and the sensor launch, bound to that site): its own part,
    then, once both have published, its network view; each pooled table holds both sites, in the run folder
    and, the same rows, in the site's DuckDB database."""
    import duckdb

    from pipelines.nightly import run_nightly, site_definitions
    from qis_fhir.evidence.pooling import CELL_KEYS

    world = site_world
    cluster = LocalCluster(tmp_path / "nodes", world / "net" / "manifest.json", ksize=3)
    sites = {}
    for name, keys, export in (("st-mary", "site", "export"), ("riverside", "riverside", "export-riverside")):
        site = SiteConfig(export_dir=str(world / export), out_root=str(tmp_path / name), site_dir=str(_site_copy(world, tmp_path / f"{name}-keys", keys)),
                          network_dir=str(world / "net"))
        sites[name] = site
    results: dict[str, list] = {name: [] for name in sites}
    try:
        cluster.start(4)
        cluster.wait_joined()
        dht = DhtConfig(bootstrap=",".join(f"{h}:{p}" for h, p in (n.address for n in cluster.live()[:2])), bind=LOOPBACK)
        defs = {name: site_definitions(site, dht) for name, site in sites.items()}
        for part in ("site", "network"):
            for name in sites:
                results[name].append(run_nightly(defs[name], PARTITION, instance, part=part))
    finally:
        cluster.stop_all()
    graph = defs["st-mary"].resolve_asset_graph()
    pooled, packets = {}, {}
    for name, runs in results.items():
        assert all(r.success for r in runs)
        mats = {k: v for r in runs for k, v in _materialized(r).items()}
        assert set(mats) == {k.to_user_string() for k in graph.materializable_asset_keys}  # every asset, in two runs
        assert [set(_materialized(r)) for r in runs][1] == {"evidence_tables", "pooled_outcomes_table"}
        # the rounds ran on the real clock: a first night releases nothing, whatever rounds are under way
        rounds = {k: v.value for k, v in mats["secure_rounds"].items()}
        assert set(rounds) == {"rounds_due", "steps", "rounds_missed", "rounds_aborted", "rounds_released", "cells_released"}
        assert rounds["rounds_released"] == rounds["cells_released"] == 0
        evaluations = {(e.asset_check_evaluation_data.asset_key.to_user_string(), e.asset_check_evaluation_data.check_name): e.asset_check_evaluation_data.passed
                       for e in _events(runs[0], "ASSET_CHECK_EVALUATION")}
        assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == set(evaluations) and all(evaluations.values())
        out = tmp_path / name / PARTITION
        packets[name] = len((out / "packets.ndjson").read_text().splitlines())
        assert packets[name] > 0 and _json(out / "publish_report.json")["confirmed"] == packets[name]
        assert _json(out / "run.json")["stages"] == ["extract", "outcomes", "quality", "packets", "publish", "evidence"]
        pooled[name] = pd.read_parquet(out / "evidence" / "pooled_outcomes.parquet")
        assert mats["evidence_tables"]["dagster/row_count"].value == len(pooled[name])
        assert mats["evidence_tables"]["sites"].value == 2

        # the same rows, queried with SQL from the site's database, as an analyst's dashboard reads them
        with duckdb.connect(str(tmp_path / name / DATABASE_FILE), read_only=True) as con:
            table = con.execute(f"select * exclude (partition_date) from {SCHEMA}.pooled_outcomes_table "
                                f"where partition_date = '{PARTITION}' order by all").fetchdf()
            (events,) = con.execute(f"select count(*) from {SCHEMA}.outcome_events_table where partition_date = '{PARTITION}'").fetchone()
        assert len(table) == len(pooled[name]) and list(table.columns) == list(pooled[name].columns)
        mine, theirs = table.set_index(CELL_KEYS).sort_index(), pooled[name].set_index(CELL_KEYS).sort_index()
        assert (mine["patients"] == theirs["patients"]).all() and (mine["sites"] == theirs["sites"]).all()
        assert mine["mean_pooled"].to_numpy() == pytest.approx(theirs["mean_pooled"].to_numpy(), nan_ok=True)
        assert events == len(pd.read_parquet(out / "outcome_events.parquet")) > 0
    for name in sites:
        assert _json(tmp_path / name / PARTITION / "evidence" / "provenance.json")["packets_used"] == sum(packets.values())

    # both sites pooled the same network: the same cells with the same pooled figures, each beside its own
    a, b = (pooled[n].set_index(CELL_KEYS).sort_index() for n in ("st-mary", "riverside"))
    assert list(a.index) == list(b.index)
    assert (a["patients"] == b["patients"]).all() and (a["sites"] == b["sites"]).all()
    assert a["sites"].max() == 2
    # a cell both published pools both sites' patients; a cell one published is that site's alone
    both = a["sites"] == 2
    assert (a.loc[both, "patients"] == a.loc[both, "local_patients"] + b.loc[both, "local_patients"]).all()
    one = a.loc[~both, "patients"]
    assert ((one == a.loc[~both, "local_patients"]) | (one == b.loc[~both, "local_patients"])).all()
    # the preview: the largest cohorts first, at most PREVIEW_ROWS of them, with their patients and sites
    preview = _materialized(results["st-mary"][1])["evidence_tables"]["preview"].value
    rows = [line.split(" | ") for line in preview.splitlines()[2:]]
    assert len(rows) == min(PREVIEW_ROWS, len(a))
    assert [int(r[2]) for r in rows] == sorted(a["patients"], reverse=True)[: len(rows)]
    top = pooled["st-mary"].sort_values("patients", ascending=False, kind="stable").iloc[0]
    assert int(rows[0][3]) == top.sites
    assert rows[0][4].rstrip(" |") == f"{top.resp_pooled * 100:.1f}% ({top.resp_pooled_lo * 100:.1f}% to {top.resp_pooled_hi * 100:.1f}%)"
    assert (tmp_path / "st-mary" / PARTITION / "evidence" / "report.html").exists()


def test_an_unreachable_dht_fails_publish_under_its_retry_policy_and_keeps_the_packets(site_world, tmp_path, instance):
    world = site_world
    site = _site(world, tmp_path, _site_copy(world, tmp_path / "site"))
    dht = DhtConfig(bootstrap=f"{LOOPBACK}:9", bind=LOOPBACK)  # the discard port: no DHT node answers there
    assets = [*UP_TO_PACKETS, publish_asset(RetryPolicy(max_retries=1, delay=0)), evidence_tables]
    result = materialize(assets, partition_key=PARTITION, resources={"site": site, "dht": dht}, instance=instance, raise_on_error=False)
    assert not result.success
    assert len(_events(result, "STEP_UP_FOR_RETRY")) == 1  # retried once, as its policy says, then failed
    assert f"no DHT peer answered at {LOOPBACK}:9" in _failure(result, "published_packets")
    assert "evidence_tables" not in _materialized(result)
    out = tmp_path / "dagster" / PARTITION
    manifest = _json(out / "run.json")
    assert manifest["status"] == "complete" and manifest["stages"] == ["extract", "outcomes", "quality", "packets"]
    assert manifest["error"]["stage"] == "publish" and manifest["error"]["exit_code"] == 11
    assert len((out / "packets.ndjson").read_text().splitlines()) == _materialized(result)["outcome_packets"]["dagster/row_count"].value

    # the rounds reach the same DHT: on the day a round of the run opens, its advertise cannot be posted,
    # and the asset fails as publish does, retried once under its policy, with the client's message
    from pipelines.assets.secagg import rounds_asset
    from qis_fhir.outcomes.events import read_outcome_tables
    from qis_fhir.packets.build import site_cells
    from qis_fhir.secagg.release import round_refs
    from qis_fhir.secagg.round import DAY, SCHEDULE

    setup = site.setup()
    tables = read_outcome_tables(out, setup.mapping)
    cells = site_cells(tables["outcome_events"], tables.get("control_units"), setup.mapping).reset_index()
    presence, _ = round_refs(setup.network.manifest.network_id, setup.mapping, cells["measure"].iloc[0], cells["period"].iloc[0])
    opening_day = SCHEDULE.starts(presence.opens) + DAY / 2
    rounds = materialize([rounds_asset(RetryPolicy(max_retries=1, delay=0), lambda: opening_day)], partition_key=PARTITION,
                         resources={"site": site, "dht": dht}, instance=instance, raise_on_error=False)
    assert not rounds.success and len(_events(rounds, "STEP_UP_FOR_RETRY")) == 1
    assert f"no DHT peer answered at {LOOPBACK}:9" in _failure(rounds, "secure_rounds")

    # a setting missing is not cured by waiting: no retry, and the message says what to set
    unset = materialize([publish_asset(RetryPolicy(max_retries=1, delay=0))], partition_key=PARTITION,
                        resources={"site": site, "dht": DhtConfig()}, instance=instance, raise_on_error=False)
    assert not unset.success and _events(unset, "STEP_UP_FOR_RETRY") == []
    assert "no DHT node configured to publish to: set QIS_BOOTSTRAP" in _failure(unset, "published_packets")


def test_rederiving_the_events_unmarks_the_packets_built_from_the_old_ones(site_world, tmp_path, instance):
    """Packets (and anything published from them) of events that were since rewritten are not current:
    a reader of the packets is refused until they are built again."""
    from qis_fhir.errors import RunIncompleteError
    from qis_fhir.runfolder import require_run

    site = _site(site_world, tmp_path, _site_copy(site_world, tmp_path / "site"))
    assert materialize(UP_TO_PACKETS, partition_key=PARTITION, resources={"site": site}, instance=instance).success
    out = tmp_path / "dagster" / PARTITION
    assert require_run(out, "packets")["stages"] == ["extract", "outcomes", "quality", "packets"]
    assert materialize([outcome_events], partition_key=PARTITION, resources={"site": site}, instance=instance).success
    assert _json(out / "run.json")["stages"] == ["extract", "outcomes", "quality"]
    with pytest.raises(RunIncompleteError, match="has not finished stage packets"):
        require_run(out, "packets")
    assert materialize([outcome_packets], partition_key=PARTITION, resources={"site": site}, instance=instance).success
    assert require_run(out, "packets")["stages"] == ["extract", "outcomes", "quality", "packets"]


def test_an_export_with_nothing_usable_stops_both_alike(tmp_path, instance):
    """The nothing-extracted rule is the extract step's: Dagster stops where `qis-fhir run` does, with the
    same message, and keeps the same quarantine for inspection."""
    from qis_fhir.errors import NothingExtractedError
    from qis_fhir.pipeline import RunConfig, run_pipeline

    export = tmp_path / "export"
    export.mkdir()
    (export / "Observation.000.ndjson").write_text('{"resourceType": "Observation"\n[1]\n')
    expected = f"no usable resource in {export} (2 read, all quarantined or skipped)"
    with pytest.raises(NothingExtractedError, match=re.escape(expected)):
        run_pipeline(RunConfig(export_dir=export, out_dir=tmp_path / "cli", site_secret_path=tmp_path / "s"))
    site = SiteConfig(export_dir=str(export), out_root=str(tmp_path / "dagster"), site_secret_path=str(tmp_path / "s"))
    result = materialize(UP_TO_PACKETS[:3], partition_key=PARTITION, resources={"site": site}, instance=instance, raise_on_error=False)
    assert not result.success and expected in _failure(result, "fhir_extract.merge_extract")
    cli, dag = tmp_path / "cli.partial", tmp_path / "dagster" / f"{PARTITION}.partial"
    assert (cli / "quarantine.ndjson").read_bytes() == (dag / "quarantine.ndjson").read_bytes()
    assert _json(cli / "run.json")["error"]["exit_code"] == _json(dag / "run.json")["error"]["exit_code"] == 6
    assert not (tmp_path / "cli").exists() and not (tmp_path / "dagster" / PARTITION).exists()


def test_a_backfill_of_an_older_day_after_a_newer_one_releases_nothing(site_world, tmp_path, instance):
    """The nightly job ran 2026-11-28; a backfill of 2026-11-27 then builds and checks its partition but
    releases no packet (each would be older than the newest release), says so in its metadata, and leaves
    the release state as it was. A re-run of 2026-11-28 on the same data releases the same bytes."""
    from qis_fhir.packets.release import RELEASE_MARK, RELEASE_STATE

    site_dir = _site_copy(site_world, tmp_path / "site")
    site = _site(site_world, tmp_path, site_dir)
    newer = materialize(UP_TO_PACKETS, partition_key="2026-11-28", resources={"site": site}, instance=instance)
    assert _materialized(newer)["outcome_packets"]["release"].value == "released 2026-11-28 as seq 2026112800 (revision 0)"
    state = {name: (site_dir / name).read_bytes() for name in (RELEASE_STATE, RELEASE_MARK)}
    released = (tmp_path / "dagster" / "2026-11-28" / "packets.ndjson").read_bytes()
    assert released.count(b"\n") > 0

    older = materialize(UP_TO_PACKETS, partition_key=PARTITION, resources={"site": site}, instance=instance)
    assert older.success
    meta = _materialized(older)["outcome_packets"]
    assert meta["release"].value == ("nothing released: 2026-11-27 is older than the newest day this site released "
                                     "(2026-11-28); the release state is left as it was")
    assert meta["dagster/row_count"].value == 0
    assert (tmp_path / "dagster" / PARTITION / "packets.ndjson").read_bytes() == b""
    report = _json(tmp_path / "dagster" / PARTITION / "disclosure_report.json")
    assert report["release"]["withheld"] == released.count(b"\n")  # built and counted, not released
    assert {name: (site_dir / name).read_bytes() for name in (RELEASE_STATE, RELEASE_MARK)} == state

    again = materialize(UP_TO_PACKETS, partition_key="2026-11-28", resources={"site": site}, instance=instance)
    assert (tmp_path / "dagster" / "2026-11-28" / "packets.ndjson").read_bytes() == released
    assert _materialized(again)["outcome_packets"]["cells_held"].value == released.count(b"\n")
