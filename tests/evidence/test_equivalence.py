"""Pooling over hospitals gives what one hospital holding every patient would have found.

One synthetic export (three treatment years) is split by patient into three hospitals' exports; each
hospital and a "central" site holding the whole export run the real extract and outcome stages and
sign their packets. The packets go straight to the collect layer (the DHT adds nothing here: its
own end-to-end test is ``test_collect_dht.py``).

* Minimum cell size 1 (manifest policy): no cell is suppressed, so pooled patients and responders
  per cohort x treatment x measure x period are identical, and pooled means equal the central
  site's exact mean within the bound the 4-decimal rounding of packets allows.
* Default minimum (11): the three hospitals' pooled figures fall short of the central truth by
  exactly the cells each hospital suppressed, read from its own outcome events.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pandas as pd
import pytest

from qis_fhir.evidence.collect import cohort_grid, collect_answers
from qis_fhir.evidence.pooling import CELL_KEYS
from qis_fhir.evidence.tables import build_tables
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.packets import add_site, build_packets, create_network, create_site, load_network
from qis_fhir.packets.build import cell_aggregates
from qis_fhir.packets.codec import encode_packet

pytestmark = pytest.mark.slow

HOSPITALS = ["hosp-1", "hosp-2", "hosp-3"]
CENTRAL = "central"
SEQ = 20241201


def _patient_of(resource: dict) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource["id"]
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    return ref.removeprefix("Patient/") if ref.startswith("Patient/") else None


def _split_by_patient(export: Path, dests: list[Path]) -> dict[str, int]:
    """Every line to the hospital its patient belongs to (resources of no patient go to all)."""
    for d in dests:
        d.mkdir(parents=True)
    patients = [set() for _ in dests]
    for part in sorted(export.glob("*.ndjson")):
        outs = [[] for _ in dests]
        for line in part.read_bytes().splitlines():
            pid = _patient_of(orjson.loads(line))
            if pid is None:
                for o in outs:
                    o.append(line)
                continue
            i = hashlib.sha256(pid.encode()).digest()[0] % len(dests)
            outs[i].append(line)
            patients[i].add(pid)
        for d, o in zip(dests, outs):
            (d / part.name).write_bytes(b"\n".join(o) + b"\n")
    return {d.name: len(p) for d, p in zip(dests, patients)}


def _events(export: Path, out: Path, mapping) -> pd.DataFrame:
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    extract_export(export, out, secret=hashlib.sha256(out.name.encode()).digest())
    return derive_outcome_events(load_extract(out), mapping).events


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Outcome events of three hospitals and of the central site: the same patients, split and whole."""
    from qis_fhir.synth import generate_export

    root = tmp_path_factory.mktemp("equivalence")
    mapping = load_mapping(MAPPINGS_ROOT / "v1")  # change-event packets: control cells are test_control_cells'
    generate_export(root / "whole", patients=1800, seed=20241, start_years=3, truth_path=root / "truth.json")
    counts = _split_by_patient(root / "whole", [root / h for h in HOSPITALS])
    assert min(counts.values()) > 450  # a real split, not one hospital holding everyone
    events = {h: _events(root / h, root / "runs" / h, mapping) for h in HOSPITALS}
    events[CENTRAL] = _events(root / "whole", root / "runs" / CENTRAL, mapping)
    return root, mapping, events


def _pooled(root: Path, mapping, events: dict, sites: list[str], min_cell: int, name: str) -> pd.DataFrame:
    """Every site in ``sites`` signs its packets under a network of ``min_cell``; the collect layer pools them."""
    net_dir = root / name
    create_network(net_dir, network_id=name, min_cell_size=min_cell)
    identities = [create_site(site_id, root / f"{name}-keys" / site_id) for site_id in sites]
    for site in identities:
        add_site(net_dir, site.site_dir)
    network = load_network(net_dir)
    wires = []
    for site in identities:
        built = build_packets(events[site.site_id], mapping, site, network, seq=SEQ, release_state=None)
        wires += [(p.fingerprint, encode_packet(p)) for p in built.packets]
    grid = cohort_grid(network, mapping)
    answers = {fp: [] for fp in grid}
    for fp, wire in wires:
        answers[fp].append(wire)
    collection = collect_answers(answers, network.manifest, grid, mapping.version)
    assert not collection.rejected and len(collection.packets) == len(wires)
    return build_tables(collection, mapping).pooled.set_index(CELL_KEYS).sort_index()


def _truth(events: pd.DataFrame, mapping) -> pd.DataFrame:
    cells = cell_aggregates(events, mapping).reset_index()
    cells = cells.rename(columns={"bucket": "condition", "treatment_code": "treatment"}).assign(mapping_version=mapping.version)
    return cells.set_index(CELL_KEYS).sort_index()


def test_three_hospitals_pool_to_the_central_figures_with_no_suppression(study):
    root, mapping, events = study
    three = _pooled(root, mapping, events, HOSPITALS, 1, "net-min1-sites")
    central = _pooled(root, mapping, events, [CENTRAL], 1, "net-min1-central")
    assert len(three) >= 60 and set(three.index.get_level_values("period")) >= {"2022", "2023", "2024"}
    assert (three["sites"] > 1).sum() >= 40  # most cells really pool several hospitals
    pd.testing.assert_frame_equal(three[["patients", "responders"]], central[["patients", "responders"]])
    exact = _truth(events[CENTRAL], mapping)
    assert exact.index.equals(three.index)
    assert (exact["patients"] == three["patients"]).all()
    for pooled in (three, central):
        error = (pooled["mean_pooled"] - exact["mean_change"]).abs()
        assert (error <= pooled["mean_tolerance"] + 1e-9).all(), error.max()


def test_with_the_default_minimum_the_shortfall_is_exactly_the_suppressed_cells(study):
    root, mapping, events = study
    three = _pooled(root, mapping, events, HOSPITALS, 11, "net-min11-sites")
    truth = _truth(events[CENTRAL], mapping)
    suppressed = pd.concat([_truth(events[h], mapping) for h in HOSPITALS])
    suppressed = suppressed[suppressed["patients"] < 11].groupby(level=CELL_KEYS)[["patients", "responders"]].sum()
    pooled = three[["patients", "responders"]].reindex(truth.index, fill_value=0)
    shortfall = truth[["patients", "responders"]] - pooled
    expected = suppressed.reindex(truth.index, fill_value=0)
    pd.testing.assert_frame_equal(shortfall.astype("int64"), expected.astype("int64"))
    vanished = ~truth.index.isin(three.index)  # every hospital suppressed the cell
    partly = truth.index.isin(three.index) & (expected["patients"] > 0).to_numpy()  # some hospitals did
    assert vanished.sum() > 0 and partly.sum() > 0, (vanished.sum(), partly.sum())
    assert set(three.index) <= set(truth.index)
    assert (three["patients"] >= 11).all()
