"""`qis-fhir run` end to end on the Synthea fixtures: outputs exist, counts add up, nothing identifying kept."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from qis_fhir.errors import ExitCode, RunIncompleteError


def qis(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qis_fhir", *map(str, args)], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), **kwargs)


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
    for part in ("extract", "outcome_events"):
        assert json.loads((out / "quality" / f"{part}.json").read_text())["success"] is True
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


def test_run_on_a_synthetic_export_passes_quality_with_one_fork_server(tmp_path, monkeypatch):
    """The demo's path: a synthetic export (with realistic noise such as cholesterol in mmol/L) must pass
    every quality suite, or the nightly run would stop before publishing anything. Both quality checks
    and the outcome stage's workers come from one fork server, so the run imports great-expectations
    once (3.5 s of CPU each time), not once per check."""
    from qis_fhir import forkserver
    from qis_fhir.pipeline import RunConfig, run_pipeline
    from qis_fhir.synth import generate_export

    stopped = []
    stop = forkserver._stop_server
    monkeypatch.setattr(forkserver, "_stop_server", lambda: stopped.append(1) or stop())
    generate_export(tmp_path / "export", patients=800, seed=5, truth_path=tmp_path / "truth.json")
    result = run_pipeline(RunConfig(export_dir=tmp_path / "export", out_dir=tmp_path / "out", site_secret_path=tmp_path / "s"))
    assert result.quality["success"] is True
    assert result.outcomes["totals"]["events"] > 0
    assert stopped == [1]


def test_run_fails_when_no_replica_confirms_the_packets(tmp_path):
    """`run --bootstrap` must not report success when every node refused the packets (the package's
    set() would have returned True): here the only node, a member's, reads an older manifest that
    does not list the site yet."""
    import shutil

    from qis_fhir.dht.cluster import LocalCluster
    from qis_fhir.packets import add_site, create_network, create_site
    from qis_fhir.synth import generate_export

    create_network(tmp_path / "older", network_id="ours", min_cell_size=11)
    generate_export(tmp_path / "export", patients=1500, seed=3, truth_path=tmp_path / "truth.json")
    cluster = LocalCluster(tmp_path / "nodes", tmp_path / "older" / "manifest.json", ksize=3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a free port for the publishing client
        s.bind(("127.0.0.1", 0))
        client_port = s.getsockname()[1]
    try:
        (node,) = cluster.start(1)  # certified in "older", which it keeps reading
        shutil.copytree(tmp_path / "older", tmp_path / "net")
        create_site("st-mary", tmp_path / "site")
        add_site(tmp_path / "net", tmp_path / "site")  # the newer manifest the site runs with
        proc = subprocess.run(
            [sys.executable, "-m", "qis_fhir", "run", str(tmp_path / "export"), "--out", str(tmp_path / "out"),
             "--site", str(tmp_path / "site"), "--network", str(tmp_path / "net"),
             "--bootstrap", f"127.0.0.1:{node.port}", "--bind", f"127.0.0.1:{client_port}"],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        cluster.stop_all()
    assert proc.returncode == ExitCode.PUBLISH_INCOMPLETE, proc.stderr[-2000:]
    assert "packets were confirmed by no replica (nodes answered: unknown_key" in proc.stderr
    # the node logged the refusal by reason, and nothing of the sender (its address included)
    node_log = (node.data_dir / "stdout.log").read_text()
    assert "(unknown_key)" in node_log and f"127.0.0.1:{client_port}" not in node_log
    report = json.loads((tmp_path / "out" / "publish_report.json").read_text())
    assert report["confirmed"] == 0 and report["unconfirmed"] == report["packets"] > 0


@pytest.fixture(scope="module")
def signing_site(tmp_path_factory):
    """A synthetic export, a network, a member site, a revoked site and a site the network never heard of."""
    from qis_fhir.packets import add_site, create_network, create_site, revoke
    from qis_fhir.synth import generate_export

    root = tmp_path_factory.mktemp("signing")
    create_network(root / "net", network_id="ours", min_cell_size=11)
    for site_id in ("member", "revoked"):
        create_site(site_id, root / site_id)
        add_site(root / "net", root / site_id)
    revoke(root / "net", "revoked")
    create_site("stranger", root / "stranger")
    generate_export(root / "export", patients=1500, seed=3, truth_path=root / "truth.json")
    return root


def _digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait_for_stage(path, stage: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before it finished stage {stage}"
        try:
            if stage in json.loads(path.read_text())["stages"]:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no stage {stage} in {path}")


def test_a_run_killed_mid_way_leaves_the_previous_run_whole_and_is_refused(signing_site, tmp_path):
    """kill -9 during `qis-fhir run` into a folder holding a complete run: the old run stays intact and
    readable, the partial one is refused with RUN_INCOMPLETE, and the next run replaces both cleanly."""
    from qis_fhir.fhir import load_extract

    root = signing_site
    out = tmp_path / "out"
    args = ["run", root / "export", "--out", out, "--site", root / "member", "--network", root / "net"]
    first = qis(*args, "--seq", 20260101)
    assert first.returncode == ExitCode.OK, first.stderr[-2000:]
    before = _digests(out)
    before_manifest = (out / "run.json").read_text()
    assert json.loads(before_manifest)["status"] == "complete"

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qis_fhir", *map(str, args), "--seq", "20260102"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        # mid-run: the new extract tables are written, outcomes and packets are not
        _wait_for_stage(tmp_path / "out.partial" / "run.json", "extract", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert _digests(out) == before  # not one file of the complete run changed
    assert len(load_extract(out)["patients"]) > 0
    ok = qis("verify", out, "--network", root / "net", "--pins", tmp_path / "pins.json")
    assert ok.returncode == ExitCode.OK, ok.stderr
    for command in (["verify", tmp_path / "out.partial", "--network", root / "net", "--pins", tmp_path / "pins.json"],
                    ["publish", tmp_path / "out.partial", "--network", root / "net", "--bootstrap", "127.0.0.1:9"]):
        refused = qis(*command)
        assert refused.returncode == ExitCode.RUN_INCOMPLETE, refused.stderr
        assert "was interrupted before it completed (its process is gone); stages done: extract" in refused.stderr
    with pytest.raises(RunIncompleteError, match="was interrupted"):
        load_extract(tmp_path / "out.partial")

    again = qis(*args, "--seq", 20260102)
    assert again.returncode == ExitCode.OK, again.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stages"] == ["extract", "outcomes", "quality", "packets"]
    assert manifest["run_id"] != json.loads(before_manifest)["run_id"]
    assert json.loads((out / "disclosure_report.json").read_text())["seq"] == 2026010200  # this run's packets: the day, revision 0


@pytest.mark.parametrize(
    ("site", "reason", "hint"),
    [("revoked", "revoked_key", "the network manifest revokes this site's key"),
     ("stranger", "unknown_key", "the network manifest does not list this site's key")],
)
def test_run_and_publish_fail_alike_when_the_site_key_is_refused(signing_site, tmp_path, site, reason, hint):
    """`run --bootstrap` with a revoked or unknown key published nothing yet exited 0; it now fails as
    `publish` of the same packets does, through the one publish policy, against a real local DHT."""
    from qis_fhir.dht.cluster import LocalCluster

    root = signing_site
    out = tmp_path / "out"
    cluster = LocalCluster(tmp_path / "nodes", root / "net" / "manifest.json", ksize=2)
    try:
        cluster.start(2)
        cluster.wait_joined()
        boot = f"127.0.0.1:{cluster.nodes[0].port}"
        run = qis("run", root / "export", "--out", out, "--site", root / site, "--network", root / "net", "--bootstrap", boot)
        publish = qis("publish", out, "--network", root / "net", "--bootstrap", boot)
    finally:
        cluster.stop_all()
    packets = len((out / "packets.ndjson").read_text().splitlines())
    assert packets > 0
    expected = f"{packets} of {packets} packets failed verification here and were not published ({reason} {packets}); {hint}"
    for proc in (run, publish):
        assert proc.returncode == ExitCode.PACKETS_REJECTED, proc.stderr[-2000:]
        assert expected in proc.stderr
    report = json.loads((out / "publish_report.json").read_text())
    assert report["rejected_locally"] == {reason: packets} and report["confirmed"] == 0
    manifest = json.loads((out / "run.json").read_text())
    assert "publish" not in manifest["stages"] and manifest["error"]["exit_code"] == ExitCode.PACKETS_REJECTED


def test_publish_of_a_run_folder_is_the_runs_publish_stage_and_a_packets_file_stays_a_file(signing_site, tmp_path):
    """`publish DIR` of a run built without --bootstrap records what `run --bootstrap` records (publish_report.json,
    stage publish in run.json); a packets.ndjson given as a file, or a folder that is no run, is published as
    before and gets nothing written beside it."""
    import shutil

    from qis_fhir.dht.cluster import LocalCluster

    root = signing_site
    out = tmp_path / "out"
    run = qis("run", root / "export", "--out", out, "--site", root / "member", "--network", root / "net")
    assert run.returncode == ExitCode.OK, run.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["stages"][-1] == "packets" and not (out / "publish_report.json").exists()
    packets = len((out / "packets.ndjson").read_text().splitlines())
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(out / "packets.ndjson", plain / "packets.ndjson")
    cluster = LocalCluster(tmp_path / "nodes", root / "net" / "manifest.json", ksize=2)
    try:
        cluster.start(2)
        cluster.wait_joined()
        boot = f"127.0.0.1:{cluster.nodes[0].port}"
        published = qis("publish", out, "--network", root / "net", "--bootstrap", boot, "--bind", "127.0.0.1", "--ksize", "2", "--json")
        as_file = qis("publish", plain / "packets.ndjson", "--network", root / "net", "--bootstrap", boot, "--bind", "127.0.0.1", "--json")
        as_folder = qis("publish", plain, "--network", root / "net", "--bootstrap", boot, "--bind", "127.0.0.1", "--json")
    finally:
        cluster.stop_all()
    assert published.returncode == ExitCode.OK, published.stderr[-2000:]
    report = json.loads((out / "publish_report.json").read_text())
    assert report == json.loads(published.stdout) and report["confirmed"] == packets > 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"][-1] == "publish" and manifest["counts"]["publish"]["confirmed"] == packets
    for proc in (as_file, as_folder):
        assert proc.returncode == ExitCode.OK, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["confirmed"] == packets
    assert sorted(p.name for p in plain.iterdir()) == ["packets.ndjson"]  # no report, no run.json made up


def test_run_and_extract_both_stop_when_nothing_is_extracted(tmp_path):
    """An export whose every line is quarantined: `run` used to carry on with zero rows where `extract`
    exits 6; both now apply the one rule, and keep the quarantine of the failed run for inspection."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "Observation.000.ndjson").write_text('{"resourceType": "Observation"\n[1]\n')
    for command in ("run", "extract"):
        out = tmp_path / command
        proc = qis(command, export, "--out", out, "--site-secret", tmp_path / "s")
        assert proc.returncode == ExitCode.NOTHING_EXTRACTED, proc.stderr[-2000:]
        assert f"no usable resource in {export} (2 read, all quarantined or skipped)" in proc.stderr
        assert not out.exists()
        partial = tmp_path / f"{command}.partial"
        assert len((partial / "quarantine.ndjson").read_text().splitlines()) == 2
        manifest = json.loads((partial / "run.json").read_text())
        assert manifest["status"] == "failed" and manifest["error"]["exit_code"] == ExitCode.NOTHING_EXTRACTED


def test_run_refuses_a_site_directory_with_a_secret_file(signing_site, tmp_path):
    """The site directory holds the patient-key secret; a second one would give the site's patients a
    second pseudonym set, so the two together are refused before anything is written."""
    root = signing_site
    proc = qis("run", root / "export", "--out", tmp_path / "out", "--site", root / "member", "--network", root / "net",
               "--site-secret", tmp_path / "s")
    assert proc.returncode == ExitCode.USAGE, proc.stderr[-2000:]
    assert "give a site directory or a patient-key secret file, not both" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
