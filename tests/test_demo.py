"""The README's first command: the multi-hospital demo on loopback, small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qis_fhir.errors import ExitCode


def test_demo_every_site_finds_every_sites_packets(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "demo", "--out", str(out), "--sites", "2", "--patients", "1500",
         "--nodes", "4", "--ksize", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    sites = {s["site_id"]: s for s in summary["sites"]}
    assert len(sites) == 2 and all(s["packets"] > 0 for s in sites.values())
    assert all(s["publish"]["confirmed"] == s["packets"] for s in sites.values())
    for lookup in summary["lookups"]:
        assert lookup["own_packets_missing"] == 0
        # the same cohorts exist at both hospitals: each sees the other's evidence
        assert set(lookup["packets_returned_by_site"]) == set(sites)
    # after both published, each hospital's evidence pools every packet of both, under pseudonyms
    assert [e["site_id"] for e in summary["evidence"]] == list(sites)
    for evidence in summary["evidence"]:
        assert evidence["packets_used"] == sum(s["packets"] for s in sites.values())
        assert evidence["sites"] == ["Hospital A", "Hospital B"] and evidence["packets_rejected"] == {}
        assert Path(evidence["pooled_table"]).is_file() and Path(evidence["report"]).is_file()
    assert "evidence each hospital got back" in proc.stdout
    # running the README's command again replaces the previous demo instead of failing
    again = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "demo", "--out", str(out), "--sites", "1", "--patients", "300",
         "--nodes", "2", "--ksize", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == ExitCode.OK, again.stderr[-3000:]
    assert len(json.loads((out / "demo_summary.json").read_text())["sites"]) == 1
    # every node the demo started was stopped by its pid
    for state in (out / "nodes").glob("*/node.json"):
        pid = json.loads(state.read_text())["pid"]
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("not a demo")
    proc = subprocess.run([sys.executable, "-m", "qis_fhir", "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.USAGE
    assert (tmp_path / "precious.txt").read_text() == "not a demo"


def _ignore_stop_signals() -> None:
    """As a background job of a non-interactive shell starts it (``nohup qis-fhir demo &`` in a script)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_demo_ui_shows_the_demos_runs_and_ctrl_c_stops_everything_it_started(tmp_path, stop):
    """``--ui``: dagster dev on the demo's instance answers on 127.0.0.1 and lists the demo's Dagster runs;
    one SIGINT (Ctrl-C) or SIGTERM to the demo stops it, the UI's processes and the DHT nodes, each
    checked by process id, even though it was started with both signals ignored."""
    import os
    import signal
    import time
    import urllib.request

    import psutil

    out = tmp_path / "demo"
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qis_fhir", "demo", "--out", str(out), "--sites", "1", "--patients", "300", "--nodes", "2",
         "--ksize", "2", "--ui"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # the signal goes to the demo only, as a test sends it
        preexec_fn=_ignore_stop_signals,
    )
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        summary = None
        while summary is None and time.monotonic() < deadline:  # the summary is written once every run is done
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            if (out / "demo_summary.json").exists():
                summary = json.loads((out / "demo_summary.json").read_text())
            else:
                time.sleep(0.5)
        assert summary is not None, "the demo did not finish within 600 s"
        url = summary["ui"]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/server_info", timeout=10) as resp:
            assert resp.status == 200
        query = json.dumps({"query": "{ runsOrError { ... on Runs { results { jobName status tags { key value } } } } }"}).encode()
        request = urllib.request.Request(f"{url}/graphql", data=query, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            runs = json.loads(resp.read())["data"]["runsOrError"]["results"]
        # the site's own part and its network view, both of the production job, both succeeded, on the UI's instance
        assert [(r["jobName"], r["status"]) for r in runs] == [("daily_outcomes", "SUCCESS")] * 2
        assert all({"key": "qis/site", "value": "st-mary"} in r["tags"] for r in runs)
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "dagster" in names and "node" in names  # the UI's processes and the DHT nodes are its children
        os.kill(proc.pid, getattr(signal, stop))
        assert proc.wait(timeout=120) == ExitCode.OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    _, alive = psutil.wait_procs(tree, timeout=30)
    left = [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert left == []
