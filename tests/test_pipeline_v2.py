"""`qis-fhir run --mapping mappings/v2` on the Synthea fixture: control units become signed control packets
that the verifier accepts and the evidence stage pools as control cells."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pandas as pd
import pytest

from qis_fhir.errors import ExitCode
from qis_fhir.mapping import load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.packets import add_site, create_network, create_site, load_network
from qis_fhir.packets.build import read_packets
from qis_fhir.packets.verifier import Verifier
from qis_fhir.privacy.fingerprint import cohort_table

V2_DIR = DEFAULT_MAPPING_DIR.parent / "v2"
MIN_CELL = 3  # 105 patients: a network of small hospitals, so that some control cells are published


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, fixtures_dir):
    root = tmp_path_factory.mktemp("v2run")
    create_network(root / "net", network_id="v2-e2e", min_cell_size=MIN_CELL)  # accepts v1 and v2 by default
    create_site("site-a", root / "site")
    add_site(root / "net", root / "site")
    proc = subprocess.run(
        [sys.executable, "-m", "qis_fhir", "run", str(fixtures_dir / "synthea-r4-105"), "--out", str(root / "run"),
         "--mapping", str(V2_DIR), "--site", str(root / "site"), "--network", str(root / "net"), "--seq", "20260101",
         "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    return root


def test_control_units_are_checked_and_signed_as_version_2_packets(v2_run):
    quality = json.loads((v2_run / "run" / "quality" / "outcome_events.json").read_text())
    assert quality["success"] and "control_units" in quality["tables"]
    verifier = Verifier(load_network(v2_run / "net").manifest)
    verdicts = [verifier.verify(w) for w in read_packets(v2_run / "run" / "packets.ndjson")]
    assert verdicts and all(v.ok for v in verdicts), {v.reason for v in verdicts}
    packets = [v.packet for v in verdicts]
    control = [p for p in packets if p.measure in ("bp_control", "lipid_control", "hba1c_poor_control")]
    assert {p.measure for p in control} >= {"bp_control", "lipid_control"}
    assert all(p.wire_version == 2 and len(p.period) == 4 and p.mapping_version == "v2" for p in control)
    assert all(p.wire_version == 1 for p in packets if p not in control)
    assert all(p.measured == 0 or MIN_CELL <= p.measured <= p.patients for p in control)
    assert any(p.responders > 0 for p in control) and any(p.measured > 0 for p in control)


def test_each_control_packet_is_its_cell_of_the_run_s_control_units(v2_run):
    """Read back against control_units.parquet: n = units, r = numerator, nm = units with a reading."""
    mapping = load_mapping(V2_DIR)
    network = load_network(v2_run / "net")
    cohorts = cohort_table(network.secret, mapping)
    units = pd.read_parquet(v2_run / "run" / "control_units.parquet")
    packets = [Verifier(network.manifest).verify(w).packet for w in read_packets(v2_run / "run" / "packets.ndjson")]
    checked = 0
    for p in packets:
        if p.measured is None:
            continue
        bucket, band, sex = cohorts[p.fingerprint]
        cell = units[(units["bucket"] == bucket) & (units["age_band"] == band) & (units["sex"] == sex)
                     & (units["treatment_code"] == p.treatment) & (units["measure"] == p.measure) & (units["period"] == p.period)]
        with_reading = cell["index_value"].notna()
        assert (p.patients, p.responders) == (len(cell), int(cell["numerator"].sum()))
        if p.measured:
            assert p.measured == int(with_reading.sum())
            assert p.mean_change == pytest.approx(cell.loc[with_reading, "index_value"].mean(), abs=1e-4)
        else:
            assert with_reading.sum() < MIN_CELL
        checked += 1
    assert checked >= 10


def test_the_evidence_stage_pools_the_run_s_control_packets_as_control_cells(v2_run):
    from qis_fhir.evidence.collect import cohort_grid, collect_answers
    from qis_fhir.evidence.tables import build_tables

    mapping = load_mapping(V2_DIR)
    network = load_network(v2_run / "net")
    answers = defaultdict(list)
    verifier = Verifier(network.manifest)
    for w in read_packets(v2_run / "run" / "packets.ndjson"):
        answers[verifier.check(w).packet.fingerprint].append(w)
    collection = collect_answers(answers, network.manifest, cohort_grid(network, mapping), "v2", local_site_id="site-a",
                                 control_measures=mapping.control_measures)
    assert collection.rejected == {}
    units = pd.read_parquet(v2_run / "run" / "control_units.parquet")
    t = build_tables(collection, mapping, local_units=units, run_date="2026-01-02")
    control = t.pooled[t.pooled["measure_kind"] == "control"]
    control_packets = [p for p in collection.packets if p.measured is not None]
    assert len(control) == len(control_packets) > 0  # one site: one row per packet
    assert control["flags"].str.contains("prevalent_users").all()
    assert control["design"].str.contains("confounded by indication").all()
    # the site's own unsuppressed figures sit beside its published ones, the same cells
    assert (control["local_patients"].astype(int) == control["patients"]).all()
    assert (control["local_responders"].astype(int) == control["responders"]).all()
