"""End to end through real DHT node processes on 127.0.0.1: ``qis-fhir evidence`` then ``qis-fhir report``.

Five nodes with ksize 5, so every node holds every key and every query asks all of them. The nodes
run with the manifest from before governance revoked site-r; the collecting site already holds the
newer one (a member can be ahead of nodes). One node is compromised: its SQLite store is edited
while it runs, to serve a forged packet and site A's older release of a cell the others hold newer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
from dht_cluster import Cluster
from report_tables import embedded_data

from qis_fhir.cli import main
from qis_fhir.dht.client import publish
from qis_fhir.dht.keys import dht_key
from qis_fhir.dht.node import STORE_FILE
from qis_fhir.packets.codec import decode_packet, encode_packet
from qis_fhir.packets.newest import wire_rank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HTN_F = ("hypertension", "40-64", "female")
HTN_M = ("hypertension", "40-64", "male")


def _plant(data_dir: Path, wire: bytes) -> None:
    """Write a packet row straight into a running node's store, past its verifier."""
    p = decode_packet(wire)
    now = time.time()
    db = sqlite3.connect(data_dir / STORE_FILE, timeout=10)
    with db:
        db.execute(
            "INSERT OR REPLACE INTO packets (key, fingerprint, site_id, packet_id, key_id, seq, wire, wire_hash,"
            " stored_at, last_republished, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (dht_key(p.fingerprint), p.fingerprint, p.site_id, p.packet_id, p.key_id, p.seq, wire, wire_rank(wire),
             now, now, now + 86400),
        )
    db.close()


def _report_cells(evidence_dir: Path) -> list[tuple]:
    """(sex, age band, treatment, patients as shown) for every row the report page shows."""
    data = embedded_data((evidence_dir / "report.html").read_text(encoding="utf-8"))
    return sorted((g["sex"], g["age_band"], t["id"], t["patients"]) for g in data["groups"] for t in g["treatments"])


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_evidence_through_real_nodes_uses_the_newest_and_counts_forged_and_revoked(enet, tmp_path, capsys):
    import dataclasses

    older = enet.wire("site-a", HTN_F, patients=20, responders=8, seq=20241101)
    newer = enet.wire("site-a", HTN_F, patients=31, responders=15, seq=20241201)
    from_b = enet.wire("site-b", HTN_M, patients=25, responders=10, seq=20241130)  # a cohort site A has no patients in
    from_c = enet.wire("site-c", HTN_F, patients=40, responders=30, seq=20241125)
    from_r = enet.wire("site-r", HTN_F, patients=50, responders=50, seq=20241201)
    forged = encode_packet(dataclasses.replace(decode_packet(enet.wire("site-b", HTN_F, treatment="TX_0002", patients=90)),
                                               signature=bytes(64)))
    cluster = Cluster(tmp_path / "nodes", enet.net.manifest, ksize=5)
    try:
        cluster.start(5)
        cluster.wait_joined()
        boot = [cluster.nodes[1].address]
        for batch in ([older], [newer, from_b, from_c, from_r]):
            assert publish(batch, boot, enet.net.manifest, ksize=5).unconfirmed == []
        compromised = cluster.nodes[0].data_dir
        _plant(compromised, older)  # this node "missed" site A's newer release
        _plant(compromised, forged)

        run_dir = tmp_path / "run"
        run_dir.mkdir()
        pd.DataFrame({
            "patient_key": ["k1", "k2"], "bucket": "hypertension", "treatment_code": "TX_0001", "measure": "systolic_bp",
            "start_period": "2024-04", "age_band": "40-64", "sex": "female", "change": [-20.0, -2.0],
            "responded": [True, False], "mapping_version": "v1",
        }).to_parquet(run_dir / "outcome_events.parquet")
        member_net = enet.revoked_copy(tmp_path / "member-net")
        out = tmp_path / "out"
        address = "{}:{}".format(*cluster.nodes[3].address)
        code = _cli("evidence", "--site", enet.net.sites["site-a"].site_dir, "--network", member_net,
                    "--bootstrap", address, "--run", run_dir, "--out", out, "--mapping", enet.mapping.path)
    finally:
        cluster.stop_all()
    assert code == 0
    evidence = out / "evidence"
    prov = json.loads((evidence / "provenance.json").read_text())
    assert prov["packets_rejected"] == {"bad_signature": 1, "revoked_key": 1}
    assert (prov["packets_received"], prov["packets_used"], prov["packets_superseded"]) == (5, 3, 0)
    assert prov["local_site"] == "Hospital A"
    assert [(s["site_id"], s["site"], s["packets"], s["as_of"]) for s in prov["sites"]] == [
        ("site-a", "Hospital A", 1, 20241201), ("site-b", "Hospital B", 1, 20241130), ("site-c", "Hospital C", 1, 20241125)]
    assert prov["cohorts_queried"] == 80
    pooled = pd.read_parquet(evidence / "pooled_outcomes.parquet").set_index(["sex", "treatment"])
    assert list(pooled.index) == [("female", "TX_0001"), ("male", "TX_0001")]
    female = pooled.loc[("female", "TX_0001")]
    assert (female["patients"], female["responders"], female["sites"]) == (31 + 40, 15 + 30, 2)  # newer of A, C; not R
    assert (female["local_patients"], female["local_responders"]) == (2, 1)
    assert female["packets_rejected"] == 2  # forged and revoked were both under this cohort
    male = pooled.loc[("male", "TX_0001")]
    assert (male["patients"], male["packets_rejected"]) == (25, 0) and pd.isna(male["local_patients"])
    # the clinician's page shows exactly the table's cells, with the pooled counts
    assert _report_cells(evidence) == [("female", "40-64", "TX_0001", "71"), ("male", "40-64", "TX_0001", "25")]
    printed = capsys.readouterr().out
    assert "Hospital A (1 packets, data of 20241201)" in printed and "site-" not in printed.split("you are")[0]

    # the report is rebuilt from the tables alone: no network, no site keys; the same tables, the same page
    written = (evidence / "report.html").read_bytes()
    for folder in (out, evidence):
        (evidence / "report.html").unlink()
        assert _cli("report", folder) == 0
        assert (evidence / "report.html").read_bytes() == written
    assert _cli("report", tmp_path / "run") == 3  # no tables there: INPUT_NOT_FOUND


def test_run_with_bootstrap_ends_with_the_evidence_stage(tmp_path):
    """``qis-fhir run --bootstrap``: after a confirmed publish the run folder holds the network's pooled
    table with this site's own figures beside it; with one site they are the same cells and counts."""
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.pipeline import RunConfig, run_pipeline
    from qis_fhir.synth import generate_export

    create_network(tmp_path / "net", network_id="run-net", min_cell_size=11)
    create_site("st-mary", tmp_path / "site")
    add_site(tmp_path / "net", tmp_path / "site")
    generate_export(tmp_path / "export", patients=1200, seed=11, truth_path=tmp_path / "truth.json")
    cluster = Cluster(tmp_path / "nodes", tmp_path / "net" / "manifest.json", ksize=3)
    try:
        cluster.start(3)
        cluster.wait_joined()
        result = run_pipeline(RunConfig(export_dir=tmp_path / "export", out_dir=tmp_path / "out", site_dir=tmp_path / "site",
                                        network_dir=tmp_path / "net", bootstrap=(cluster.nodes[0].address,), seq=20241201))
    finally:
        cluster.stop_all()
    prov = result.evidence["provenance"]
    assert prov["local_site"] == "Hospital A" and prov["packets_used"] == result.packets["packets"] > 0
    assert prov["sites"] == [{"site": "Hospital A", "site_id": "st-mary", "packets": result.packets["packets"],
                              "as_of": 20241201, "oldest_as_of": 20241201}]
    pooled = pd.read_parquet(tmp_path / "out" / "evidence" / "pooled_outcomes.parquet")
    assert len(pooled) == result.packets["packets"]
    assert (pooled["local_patients"] == pooled["patients"]).all()
    # a control cell with fewer than 11 readings publishes no mean (docs/packets.md): the network has
    # none to pool, while the site still sees its own beside it
    withheld = pooled["measured"] == 0
    assert pooled.loc[withheld, "measure_kind"].isin(["control", "poor_control"]).all()
    assert pooled.loc[withheld, "mean_pooled"].isna().all() and pooled.loc[withheld, "local_mean"].notna().all()
    # both shown to 4 decimals, one from the raw mean, one from the packet's (itself rounded to 4):
    # they may differ by one in the last digit (137.20625 -> 137.2062 here, 137.2063 there)
    assert ((pooled["local_mean"] - pooled["mean_pooled"]).abs()[~withheld] <= 1e-4 + 1e-9).all()
    shown = _report_cells(tmp_path / "out" / "evidence")
    assert shown == sorted((r.sex, r.age_band, r.treatment, f"{r.patients:,}") for r in pooled.itertuples())
    assert "evidence/pooled_outcomes.csv" in result.outputs()


def test_evidence_says_what_is_missing_before_writing_anything(enet, tmp_path):
    """A run folder without outcome events is refused before the network is asked (exit 3); a
    bootstrap address where no node answers is NO_PEERS (exit 11); neither leaves tables behind."""
    import socket

    site = enet.net.sites["site-b"].site_dir
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, never answers
        common = ["--site", site, "--network", enet.net.net_dir, "--bootstrap", silent, "--out", tmp_path / "out"]
        assert _cli("evidence", *common, "--run", tmp_path / "no-run") == 3
        assert _cli("evidence", *common) == 11
    assert not (tmp_path / "out" / "evidence").exists()
