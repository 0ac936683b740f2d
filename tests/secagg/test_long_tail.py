"""The long tail, end to end offline: cohorts too small to publish at any hospital reach the pooled table.

* Five synthetic hospitals (one per synth site profile, 600 patients each) with the planted rare
  cohort (hypertensive women 18-39 on hydrochlorothiazide) at 4-10 patients per hospital: under the
  default minimum cell size (11) no hospital publishes it, yet the pooled table shows it with exactly
  the totals of one central count of the same patients, marked as a secure total, and the evidence
  stage flags it ``contradicts_condition``. Each hospital runs the real extract and outcome stages; its
  clear packets go to the collect layer directly, its secure rounds over a LocalBoard.
* The Synthea fixture (105 patients) through extract and outcomes under mapping v2 (change and control
  measures), its patients split by key into three hospitals (a patient's outcomes depend on the
  patient's records only, so this is the split export), minimum cell size 3: every value-round total
  equals the count over the same patients of the hospitals that put the cell in, every pooled cell
  (clear packets + secure total) equals the single-site count, and cells no hospital could publish
  alone are released.

Measured: the synthetic network pools 22 cells, 15 of them with a secure total; the rare cohort is one
of them (all five hospitals, 4-10 patients each). The Synthea split runs 153 (measure, period) pairs
of rounds; 6 cells have patients at all three hospitals, none of them 3 at any one, and all 6 are
released. About 90 s for the module, most of it the extract and outcome stages and the Synthea
rounds (3 sites, 2 rounds each, 153 times).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
from dht_cluster import make_network

from qis_fhir.evidence.collect import cohort_grid, collect_answers
from qis_fhir.evidence.tables import build_tables, secure_label
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.packets import build_packets, load_network
from qis_fhir.packets.codec import encode_packet
from qis_fhir.secagg.local import aggregate
from qis_fhir.secagg.protocol import Roster
from qis_fhir.secagg.release import released_cells, round_refs, shown, site_input
from qis_fhir.secagg.values import cell_figures, patient_rows, round_cells
from qis_fhir.synth import generate_export
from qis_fhir.synth.effects import PROFILES, RARE, rare_key

PROFILE_NAMES = sorted(PROFILES)
RARE_PER_SITE = [4, 6, 8, 10, 7]  # planted rare patients per hospital
PATIENTS = 600
MIN_CELL = 11
SEQ = 20250101


def _outcomes(export, out, mapping):
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    extract_export(export, out, secret=hashlib.sha256(b"one patient-key secret for the whole test").digest())
    return derive_outcome_events(load_extract(out), mapping)


def _rounds(events: dict, units: dict, mapping, roster, keys, min_cell, network_id) -> list:
    """Both rounds of every (measure, period) the hospitals have: (ref, inputs, SecureRelease)."""
    pairs = set().union(*(_measure_periods(events[sid], units.get(sid), mapping) for sid in events))
    out = []
    for measure, period in sorted(pairs):
        refs = round_refs(network_id, mapping, measure, period)
        inputs = {sid: site_input(events[sid], units.get(sid), mapping, measure, period, min_cell) for sid in events}
        out.append((refs[1], inputs, asyncio.run(aggregate(inputs, keys, roster, refs, min_cell))))
    return out


def _measure_periods(events, units, mapping):
    from qis_fhir.packets.build import site_cells

    cells = site_cells(events, units, mapping).reset_index()
    return set(zip(cells["measure"], cells["period"]))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("longtail")
    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # the synthetic rare cohort is planted for v1's change windows
    net = make_network(root, [f"hosp-{p}" for p in PROFILE_NAMES])  # minimum cell size 11
    sites = list(net.sites.values())
    network = load_network(net.net_dir)
    assert network.manifest.min_cell_size == MIN_CELL
    grid = cohort_grid(network, mapping)
    answers: dict[str, list[bytes]] = {fp: [] for fp in grid}
    events, packets = {}, {}
    for j, (site, profile) in enumerate(zip(sites, PROFILE_NAMES)):
        export = root / f"export-{j}"
        generate_export(export, patients=PATIENTS, seed=500 + j, site_profile=profile, rare_patients=RARE_PER_SITE[j],
                        truth_path=root / f"truth-{j}.json")
        events[site.site_id] = _outcomes(export, root / f"run-{j}", mapping).events
        shutil.rmtree(export)
        packets[site.site_id] = build_packets(events[site.site_id], mapping, site, network, seq=SEQ).packets
        for p in packets[site.site_id]:
            answers[p.fingerprint].append(encode_packet(p))
    roster = Roster.from_manifest(network.manifest)
    keys = {s.site_id: s.private_key for s in sites}
    rounds = _rounds(events, {}, mapping, roster, keys, MIN_CELL, network.manifest.network_id)
    collection = collect_answers(answers, network.manifest, grid, mapping.version)
    secure = pd.concat([r[2].table for r in rounds], ignore_index=True)
    tables = build_tables(collection, mapping, secure_totals=secure)
    return {"mapping": mapping, "events": events, "rounds": rounds, "tables": tables, "collection": collection,
            "packets": packets, "secret": network.secret}


def _central(mapping, events: dict, measure: str, period: str, cell, units: dict | None = None) -> np.ndarray:
    """One central count of a cell over every hospital's patients (all patient rows together)."""
    units = units or {}
    cells = round_cells(mapping, measure)
    rows = pd.concat([patient_rows(events[h], units.get(h), mapping, measure, period) for h in events])
    return cell_figures(rows, cells)[cells.index(cell)]


def _rare_cell():
    """(bucket, age band, sex, treatment code) of the planted rare cohort."""
    bucket, _, band, sex = rare_key()
    return (bucket, band, sex, RARE.treatment.tx_code)


def test_rare_cohort_small_everywhere_is_pooled_exactly_and_flagged(synthetic):
    mapping, events, tables = synthetic["mapping"], synthetic["events"], synthetic["tables"]
    bucket, band, sex, tx = _rare_cell()
    pooled = tables.pooled
    rare = pooled[(pooled["condition"] == bucket) & (pooled["age_band"] == band) & (pooled["sex"] == sex)
                  & (pooled["treatment"] == tx) & (pooled["measure"] == "systolic_bp")]
    assert len(rare) == 1, rare[["period", "patients"]]
    row = rare.iloc[0]
    cell = (bucket, band, sex, tx)
    per_site = [_central(mapping, {h: e}, "systolic_bp", row["period"], cell) for h, e in events.items()]
    assert all(0 < f[0] < MIN_CELL for f in per_site), [int(f[0]) for f in per_site]  # no hospital could publish it
    central = _central(mapping, events, "systolic_bp", row["period"], cell)
    assert (row["patients"], row["responders"], row["measured"]) == (central[0], central[1], central[2])
    assert row["sites"] == 5 and row["secure_sites"] == 5 and row["packets_used"] == 0
    rows = pd.concat([patient_rows(e, None, mapping, "systolic_bp", row["period"]) for e in events.values()])
    values = rows[(rows["bucket"] == bucket) & (rows["age_band"] == band) & (rows["sex"] == sex)
                  & (rows["treatment_code"] == tx)]["value"]
    assert row["mean_pooled"] == pytest.approx(values.round(2).mean(), abs=1e-9)
    flags = row["flags"].split(";")
    assert "contradicts_condition" in flags and "secure_total" in flags
    # no hospital's own figures for it anywhere: one site-estimate row, the secure total
    est = tables.per_site[(tables.per_site["condition"] == bucket) & (tables.per_site["age_band"] == band)
                          & (tables.per_site["sex"] == sex) & (tables.per_site["treatment"] == tx)
                          & (tables.per_site["measure"] == "systolic_bp")]
    assert est["site"].tolist() == [secure_label(5)]


def test_secure_totals_never_include_clear_published_figures(synthetic):
    """Every pooled cell is its clear packets plus one disjoint secure total: the pooled patients equal
    the central count over all five hospitals wherever the cell was shown."""
    mapping, events, tables = synthetic["mapping"], synthetic["events"], synthetic["tables"]
    pooled = tables.pooled
    both = pooled[(pooled["secure_sites"] > 0) & (pooled["packets_used"] > 0)]
    for _, row in pd.concat([both, pooled[pooled["secure_sites"] > 0]]).drop_duplicates(subset=["condition", "age_band", "sex", "treatment", "measure", "period"]).iterrows():
        cell = (row["condition"], row["age_band"], row["sex"], row["treatment"])
        central = _central(mapping, events, row["measure"], row["period"], cell)
        assert row["patients"] == central[0] and row["responders"] == central[1]


def test_cells_released_in_packets_are_the_cells_kept_out_of_masked_sums(synthetic):
    """A site's release state names, through the cohort grid, exactly the cells it marks clear now."""
    mapping = synthetic["mapping"]
    checked = 0
    for ref, inputs, _ in synthetic["rounds"]:
        for site, inp in inputs.items():
            released = released_cells(synthetic["packets"][site], synthetic["secret"], mapping, ref.measure, ref.period)
            assert released == {c for c, clear in zip(inp.cells, inp.clear) if clear}
            checked += len(released)
    assert checked > 0


def test_synthea_split_into_three_sites(fixtures_dir, tmp_path):
    mapping = load_mapping(DEFAULT_MAPPING_DIR.parent / "v2")
    result = _outcomes(fixtures_dir / "synthea-r4-105", tmp_path / "run", mapping)

    def split(frame):
        which = frame["patient_key"].map(lambda k: hashlib.sha256(str(k).encode()).digest()[0] % 3)
        return {f"hosp-{i}": frame[which == i].reset_index(drop=True) for i in range(3)}

    events, units = split(result.events), split(result.units)
    from .conftest import Sites

    s = Sites(3)
    s.ids = list(events)
    keys = dict(zip(events, s.keys.values()))
    roster = Roster(dict(zip(events, s.roster.keys.values())), 3)
    rounds = _rounds(events, units, mapping, roster, keys, 3, "synthea-split")
    released_small_everywhere = 0
    summed_cells = 0
    for ref, inputs, release in rounds:
        cells = round_cells(mapping, ref.measure)
        central = cell_figures(pd.concat([patient_rows(events[h], units[h], mapping, ref.measure, ref.period) for h in events]), cells)
        for j, i in enumerate(release.eligible):
            secure_sites = [h for h in inputs if not inputs[h].clear[i] and inputs[h].figures[i, 0] > 0]
            expected = sum(inputs[h].figures[i] for h in secure_sites)
            np.testing.assert_array_equal(release.decoded[j, 1:], expected)
            clear = sum((inputs[h].figures[i] for h in inputs if inputs[h].clear[i]), np.zeros(5, np.int64))
            np.testing.assert_array_equal(release.decoded[j, 1:] + clear, central[i])  # the single-site count
            summed_cells += 1
            if shown(release.decoded, 3, 3)[j] and all(inputs[h].figures[i, 0] < 3 for h in inputs):
                released_small_everywhere += 1
    assert summed_cells >= 1
    assert released_small_everywhere >= 1, f"{summed_cells} cells summed, none released that no site could publish"
