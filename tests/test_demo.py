"""The README's first command: the multi-hospital demo on loopback, small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
