"""`qis-fhir run` end to end on the Synthea fixtures: outputs exist, counts add up, nothing identifying kept."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pandas as pd
import pytest

from qis_fhir.errors import ExitCode


@pytest.fixture(scope="module")
def r4_run(tmp_path_factory, fixtures_dir):
    export = fixtures_dir / "synthea-r4-105"
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "run", str(export), "--out", str(out), "--site-secret", str(out.parent / "site.secret")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    return export, out, proc


def test_run_writes_outcome_events_and_summary(r4_run):
    _, out, proc = r4_run
    events = pd.read_parquet(out / "outcome_events.parquet")
    summary = json.loads((out / "outcome_summary.json").read_text())
    assert {"hypertension", "hyperlipidemia"} <= set(events["bucket"])
    assert len(events) > 0
    assert (events["change"] - (events["followup_value"] - events["baseline_value"])).abs().max() < 1e-9
    assert summary  # counts by bucket, treatment and exclusion reason
    quality = json.loads((out / "quality_report.json").read_text())
    assert quality["success"] is True
    assert "outcome_events.parquet" in proc.stdout


def test_run_counts_add_up(r4_run):
    _, out, _ = r4_run
    summary = json.loads((out / "extract" / "summary.json").read_text())
    for name, counts in summary["by_type"].items():
        assert counts["read"] == counts["accepted"] + counts["quarantined"], name
    quarantined = sum(1 for _ in (out / "quarantine.ndjson").open()) if (out / "quarantine.ndjson").exists() else 0
    assert quarantined == summary["totals"]["quarantined"]


def test_no_raw_patient_id_in_any_output(r4_run):
    export, out, proc = r4_run
    ids = [json.loads(line)["id"] for line in (export / "Patient.000.ndjson").open()]
    blobs = [proc.stdout.encode(), proc.stderr.encode()]
    for path in out.rglob("*"):
        if path.suffix == ".parquet":  # compressed: compare the decoded values, not the bytes
            blobs.append(pd.read_parquet(path).to_csv(index=False).encode())
        elif path.is_file():
            blobs.append(path.read_bytes())
    for pid in ids[:50]:
        assert not any(pid.encode() in blob for blob in blobs), "a raw patient id reached an output"


def test_run_on_a_synthetic_export_passes_quality(tmp_path):
    """The demo's path: a synthetic export (with realistic noise such as cholesterol in mmol/L) must pass
    every quality suite, or the nightly run would stop before publishing anything."""
    from qis_fhir.pipeline import RunConfig, run_pipeline
    from qis_fhir.synth import generate_export

    generate_export(tmp_path / "export", patients=800, seed=5, truth_path=tmp_path / "truth.json")
    result = run_pipeline(RunConfig(export_dir=tmp_path / "export", out_dir=tmp_path / "out", site_secret_path=tmp_path / "s"))
    assert result.quality["success"] is True
    assert result.outcomes["totals"]["events"] > 0


def test_run_fails_when_no_replica_confirms_the_packets(tmp_path):
    """`run --bootstrap` must not report success when every node refused the packets (the package's
    set() would have returned True): here the only node trusts another network's manifest."""
    from qis_fhir.dht.cluster import LocalCluster
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.synth import generate_export

    create_network(tmp_path / "net", network_id="ours", min_cell_size=11)
    create_network(tmp_path / "other", network_id="theirs", min_cell_size=11)
    create_site("st-mary", tmp_path / "site")
    add_site(tmp_path / "net", tmp_path / "site")
    generate_export(tmp_path / "export", patients=1500, seed=3, truth_path=tmp_path / "truth.json")
    cluster = LocalCluster(tmp_path / "nodes", tmp_path / "other" / "manifest.json", ksize=3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a free port for the publishing client
        s.bind(("127.0.0.1", 0))
        client_port = s.getsockname()[1]
    try:
        (node,) = cluster.start(1)
        proc = subprocess.run(
            [sys.executable, "-m", "qis_fhir", "run", str(tmp_path / "export"), "--out", str(tmp_path / "out"),
             "--site", str(tmp_path / "site"), "--network", str(tmp_path / "net"),
             "--bootstrap", f"127.0.0.1:{node.port}", "--bind", f"127.0.0.1:{client_port}"],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        cluster.stop_all()
    assert proc.returncode == ExitCode.PUBLISH_INCOMPLETE, proc.stderr[-2000:]
    assert "confirmed by no DHT replica" in proc.stderr
    # --bind reached the publishing client: the node logged the refused packets' sender
    assert f"latest from 127.0.0.1:{client_port}: unknown_key" in (node.data_dir / "stdout.log").read_text()
    report = json.loads((tmp_path / "out" / "publish_report.json").read_text())
    assert report["confirmed"] == 0 and report["unconfirmed"] == report["packets"] > 0
