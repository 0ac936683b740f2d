"""On real Synthea data split into hospitals, the pooled table equals a count made by hand.

The 105-patient Synthea fixture is split by patient into two hospitals (fresh site folders, a
network whose minimum cell size is 1, so nothing is suppressed). Each hospital runs the whole
pipeline (``run_pipeline``: extract, quality, outcomes, signed packets); the packets go to the
collect layer directly (no DHT: ``test_collect_dht.py`` covers the network) and are pooled by
``build_tables``. The expected figures are computed here from each hospital's own
``outcome_events.parquet`` alone, with pandas: the period cut at the mapping's granularity, one event
per patient per cell (the earliest, as packets count), then patients, responders, mean and SD
(ddof 1) over every patient of every hospital. Nothing of the library's aggregation is called.

* patients, responders, the pooled share and the number of hospitals per cell are equal, and the
  collecting hospital's own (``local_*``) figures are its own events' counts;
* the pooled mean is within the documented rounding tolerance (each packet's mean is rounded to 4
  decimals: 0.00005 plus the float error of summing ``k`` products, ``docs/evidence.md``);
* the pooled SD is within the bound the packets' rounding allows, derived here: the pooled SD is
  ``|v| / sqrt(N - 1)`` for the vector ``v`` of the components ``sqrt(n_i - 1) s_i`` and
  ``sqrt(n_i) (m_i - M)``; rounding moves ``s_i`` by at most ``d = 0.00005`` and ``m_i - M`` by at
  most ``2d`` (``M`` is an average of the rounded means), so by the triangle inequality the SD moves
  by at most ``d sqrt((5N - k) / (N - 1))``.

What the fixture gives (measured): under mapping v1 only 6 of its 43 treatment episodes have a
baseline within 180 days and a follow-up, and their starts span 1991-2019, so each of the 6 cells
holds one patient (hospital 1 publishes 4 packets, hospital 2 publishes 2; SD undefined). The fixture
cannot show more under v1. The second case uses a copy of v1 whose baseline and follow-up windows
are 10 years: 8 events in 7 cells, one of which (hypertension, hydrochlorothiazide, 18-39, male,
2016) pools one patient from each hospital (mean -17.15, SD 17.67), so the pooled mean and SD of a
real two-hospital cell are checked too. Largest differences seen: mean 4.9e-5 (tolerance 5.0e-5),
SD 1.2e-5 (bound 1.4e-4). About 15 s for both cases.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from qis_fhir.evidence.collect import CELL_KEYS, cohort_grid, collect_answers
from qis_fhir.evidence.tables import build_tables
from qis_fhir.mapping import load_mapping
from qis_fhir.outcomes.events import OUTCOME_EVENTS
from qis_fhir.packets import add_site, create_network, create_site, load_network
from qis_fhir.packets.build import PACKETS_FILE, read_packets
from qis_fhir.packets.codec import decode_packet
from qis_fhir.pipeline import RunConfig, run_pipeline

REPO = Path(__file__).resolve().parents[2]
HOSPITALS = ["hosp-1", "hosp-2"]
SEQ = 20241201
ROUNDING = 0.5e-4  # half a unit of the packets' 4th decimal
EPS = np.finfo(float).eps
WIDE_DAYS = 3650


def _patient_of(resource: dict) -> str:
    if resource["resourceType"] == "Patient":
        return resource["id"]
    ref = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    if not ref.startswith("Patient/"):
        raise AssertionError("every resource of this fixture belongs to one patient")
    return ref.removeprefix("Patient/")


def _split(export: Path, dests: list[Path]) -> list[int]:
    """Each line to the hospital its patient hashes to; returns patients per hospital."""
    patients: list[set[str]] = [set() for _ in dests]
    for d in dests:
        d.mkdir(parents=True)
    for part in sorted(export.glob("*.ndjson")):
        outs: list[list[bytes]] = [[] for _ in dests]
        for line in part.read_bytes().splitlines():
            pid = _patient_of(orjson.loads(line))
            i = hashlib.sha256(pid.encode()).digest()[0] % len(dests)
            outs[i].append(line)
            patients[i].add(pid)
        for d, lines in zip(dests, outs):
            (d / part.name).write_bytes(b"".join(line + b"\n" for line in lines))
    return [len(p) for p in patients]


def _wide_mapping(root: Path) -> Path:
    """mappings/v1 with every baseline and follow-up window widened to WIDE_DAYS days."""
    mapping_dir = root / "mappings" / "v1"  # the loader insists the folder is named after the version
    shutil.copytree(REPO / "mappings" / "v1", mapping_dir)
    path = mapping_dir / "outcomes.yaml"
    text, n_base = re.subn(r"baseline_days: \d+", f"baseline_days: {WIDE_DAYS}", path.read_text())
    text, n_follow = re.subn(r"followup_days: \[(\d+), \d+\]", rf"followup_days: [\1, {WIDE_DAYS}]", text)
    assert n_base == n_follow == 3
    path.write_text(text)
    return mapping_dir


def _period(start_period: str, granularity: str) -> str:
    year, month = int(start_period[:4]), int(start_period[5:7])
    return {"year": f"{year}", "quarter": f"{year}-Q{(month + 2) // 3}", "month": f"{year}-{month:02d}"}[granularity]


def _patients_per_cell(events: pd.DataFrame, mapping) -> pd.DataFrame:
    """One row per patient per cell from a hospital's events: the earliest event, as packets count."""
    assert np.isfinite(events["change"]).all()
    df = events.assign(
        condition=events["bucket"],
        treatment=events["treatment_code"],
        age_band=events["age_band"].fillna("unknown"),
        sex=events["sex"].fillna("unknown"),
        period=[_period(s, mapping.cohorts.period) for s in events["start_period"]],
    )
    df = df.sort_values(["start", "event_id"]).drop_duplicates(CELL_KEYS + ["patient_key"], keep="first")
    return df[CELL_KEYS + ["patient_key", "change", "responded"]]


def _by_hand(runs: dict[str, Path], mapping) -> pd.DataFrame:
    per_patient = pd.concat(
        [_patients_per_cell(pd.read_parquet(run / OUTCOME_EVENTS), mapping).assign(site=site) for site, run in runs.items()]
    )
    cells = per_patient.groupby(CELL_KEYS)
    return pd.DataFrame({
        "sites": cells["site"].nunique(),
        "patients": cells.size(),
        "responders": cells["responded"].sum().astype("int64"),
        "mean": cells["change"].mean(),
        "sd": cells["change"].std(ddof=1),
        "mean_abs": cells["change"].apply(lambda x: x.abs().mean()),
    }).sort_index()


@pytest.fixture(params=["v1", "v1-wide-windows"])
def hospitals(request, fixtures_dir, tmp_path):
    """Two hospitals' finished runs on the split fixture, their network, and the mapping they used."""
    mapping_dir = _wide_mapping(tmp_path) if request.param == "v1-wide-windows" else REPO / "mappings" / "v1"
    mapping = load_mapping(mapping_dir)
    counts = _split(fixtures_dir / "synthea-r4-105", [tmp_path / "exports" / h for h in HOSPITALS])
    assert sum(counts) == 105 and min(counts) >= 25, counts
    net_dir = tmp_path / "network"
    create_network(net_dir, network_id="fixture-sites", min_cell_size=1)
    for h in HOSPITALS:
        add_site(net_dir, create_site(h, tmp_path / "sites" / h).site_dir)
    runs = {}
    for h in HOSPITALS:
        runs[h] = tmp_path / "runs" / h
        run_pipeline(RunConfig(export_dir=tmp_path / "exports" / h, out_dir=runs[h], mapping_dir=mapping_dir,
                               site_dir=tmp_path / "sites" / h, network_dir=net_dir, seq=SEQ))
    return request.param, mapping, load_network(net_dir), runs


def test_pooled_figures_equal_a_count_from_the_hospitals_own_events(hospitals):
    name, mapping, network, runs = hospitals
    grid = cohort_grid(network, mapping)
    answers: dict[str, list[bytes]] = {fp: [] for fp in grid}
    for run in runs.values():
        for wire in read_packets(run / PACKETS_FILE):
            answers[decode_packet(wire).fingerprint].append(wire)
    collection = collect_answers(answers, network.manifest, grid, mapping.version, local_site_id=HOSPITALS[0])
    tables = build_tables(collection, mapping, local_events=pd.read_parquet(runs[HOSPITALS[0]] / OUTCOME_EVENTS))
    pooled = tables.pooled.set_index(CELL_KEYS).sort_index()

    expected = _by_hand(runs, mapping)
    assert len(expected) == {"v1": 6, "v1-wide-windows": 7}[name]
    assert (expected["sites"] > 1).sum() == {"v1": 0, "v1-wide-windows": 1}[name]
    assert not collection.rejected and collection.superseded == 0
    assert len(collection.packets) == expected["sites"].sum()  # one packet per hospital per cell
    assert pooled.index.equals(expected.index)
    for col in ("sites", "patients", "responders"):
        assert pooled[col].tolist() == expected[col].tolist(), col
    assert (pooled["resp_pooled"] == expected["responders"] / expected["patients"]).all()

    mean_tolerance = ROUNDING + (expected["sites"] + 2) * EPS * expected["mean_abs"]
    assert ((pooled["mean_pooled"] - expected["mean"]).abs() <= mean_tolerance).all()

    n, k = expected["patients"], expected["sites"]
    sd_tolerance = ROUNDING * np.sqrt((5 * n - k) / (n - 1)) + 1e-9 * expected["sd"]
    several = n >= 2
    assert ((pooled["sd_pooled"] - expected["sd"]).abs()[several] <= sd_tolerance[several]).all()
    assert pooled["sd_pooled"][~several].isna().all()  # one patient has no SD

    # the collecting hospital's own figures beside the network's: its cells only, unsuppressed
    own = _by_hand({HOSPITALS[0]: runs[HOSPITALS[0]]}, mapping)
    local = pooled["local_patients"].dropna()
    assert local.index.equals(own.index)
    assert local.astype(int).tolist() == own["patients"].tolist()
    assert pooled.loc[own.index, "local_responders"].astype(int).tolist() == own["responders"].tolist()
