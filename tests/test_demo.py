"""The README's first command: the multi-hospital demo on loopback, small."""

from __future__ import annotations

import json
import subprocess
import sys

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
    # every node the demo started was stopped by its pid
    for state in (out / "nodes").glob("*/node.json"):
        pid = json.loads(state.read_text())["pid"]
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
