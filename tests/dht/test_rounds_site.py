"""Both rounds of one (measure, period) over the DHT from three sites' run folders, night by night.

The Synthea fixture through extract and outcomes (mapping v2), its patients split into three
hospitals, each with its own run folder, site key and state; a network at a minimum cell size of 3.
Each simulated night every site calls ``rounds_step`` (what ``qis-fhir secagg run --run`` does) over
nodes on 127.0.0.1 that enforce the windows on the test's clock: the presence round, then the value
round opening when the presence round is unmasked, then the release into each site's ledger. The
released totals equal the single-site totals of the same patients, for a cell no site could publish.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from dht_cluster import Clock, certify_nodes, round_nodes_in_thread

from qis_fhir.mapping import load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.outcomes.control import CONTROL_UNITS
from qis_fhir.outcomes.events import OUTCOME_EVENTS
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import add_site, create_network, load_network
from qis_fhir.secagg.release import LEDGER_DIR, ReleaseLedger, round_refs, site_input
from qis_fhir.secagg.round import DAY, SCHEDULE
from qis_fhir.secagg.site import rounds_step
from qis_fhir.secagg.values import cell_figures, patient_rows, round_cells
from qis_fhir.stages import SiteSetup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MIN_CELL = 3
SITES = ("hosp-0", "hosp-1", "hosp-2")


def _small_everywhere(events: dict, units: dict, mapping) -> tuple[str, str, int]:
    """A (measure, period, cell index) whose cell has 1 or 2 patients at each of the three sites, and
    whose rounds have both opened by today (sites refuse a round before its opening day)."""
    from qis_fhir.packets.build import site_cells

    today = datetime.now(UTC).date().isoformat()
    pairs = set()
    for h in events:
        cells = site_cells(events[h], units[h], mapping).reset_index()
        pairs |= set(zip(cells["measure"], cells["period"]))
    for measure, period in sorted(pairs):
        if round_refs("x", mapping, measure, period)[1].opens > today:
            continue
        inputs = [site_input(events[h], units[h], mapping, measure, period, MIN_CELL) for h in events]
        for i in range(len(inputs[0].cells)):
            if all(0 < inp.figures[i, 0] < MIN_CELL and not inp.clear[i] for inp in inputs):
                return measure, period, i
    raise AssertionError("the split has no cell small at every site")


def test_three_sites_release_over_the_dht_what_no_site_could_publish(fixtures_dir, tmp_path):
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    mapping = load_mapping(DEFAULT_MAPPING_DIR.parent / "v2")
    extract_export(fixtures_dir / "synthea-r4-105", tmp_path / "extract", secret=hashlib.sha256(b"one secret for the whole fixture").digest())
    result = derive_outcome_events(load_extract(tmp_path / "extract"), mapping)

    def split(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
        which = frame["patient_key"].map(lambda k: hashlib.sha256(str(k).encode()).digest()[0] % 3)
        return {h: frame[which == i].reset_index(drop=True) for i, h in enumerate(SITES)}

    events, units = split(result.events), split(result.units)
    measure, period, cell = _small_everywhere(events, units, mapping)

    net_dir = tmp_path / "net"
    create_network(net_dir, network_id="synthea-split", min_cell_size=MIN_CELL)
    for h in SITES:
        create_site(h, tmp_path / "sites" / h)
        add_site(net_dir, tmp_path / "sites" / h)
        (tmp_path / "runs" / h).mkdir(parents=True)
        events[h].to_parquet(tmp_path / "runs" / h / OUTCOME_EVENTS, index=False)
        units[h].to_parquet(tmp_path / "runs" / h / CONTROL_UNITS, index=False)
    node_identities = certify_nodes(net_dir / "manifest.json", 4)
    network = load_network(net_dir)
    from qis_fhir.packets import load_site

    setups = {h: SiteSetup(mapping, None, b"", load_site(tmp_path / "sites" / h), network, tmp_path / "sites" / h, net_dir) for h in SITES}
    presence_ref, value_ref = round_refs(network.manifest.network_id, mapping, measure, period)
    clock = Clock(SCHEDULE.starts(presence_ref.opens) + DAY / 2)

    statuses = []
    with round_nodes_in_thread(net_dir / "manifest.json", clock, node_identities, 3) as addresses:
        for night in range(15):  # noon of each day: presence days 0-6, unmask and value days 7-13, unmask day 14
            clock.t = SCHEDULE.starts(presence_ref.opens) + night * DAY + DAY / 2
            for h in SITES:
                statuses.append(rounds_step(tmp_path / "runs" / h, setups[h], measure, period, state_dir=tmp_path / "state" / h,
                                            bootstrap=tuple(addresses[:1]), ksize=3, clock=clock))

    tables = {h: ReleaseLedger(tmp_path / "sites" / h / LEDGER_DIR).tables(mapping.version) for h in SITES}
    for h in SITES[1:]:
        pd.testing.assert_frame_equal(tables[h], tables[SITES[0]])  # every member released the same totals
    table = tables[SITES[0]]
    cells = round_cells(mapping, measure)
    bucket, band, sex, treatment = cells[cell]
    row = table[(table["condition"] == bucket) & (table["age_band"] == band) & (table["sex"] == sex) & (table["treatment"] == treatment)]
    assert len(row) == 1, statuses[-3:]
    central = cell_figures(pd.concat([patient_rows(events[h], units[h], mapping, measure, period) for h in SITES]), cells)[cell]
    assert (int(row["patients"].iloc[0]), int(row["responders"].iloc[0]), int(row["sites"].iloc[0])) == (int(central[0]), int(central[1]), 3)
    assert int(row["patients"].iloc[0]) >= MIN_CELL and all(
        0 < int(site_input(events[h], units[h], mapping, measure, period, MIN_CELL).figures[cell, 0]) < MIN_CELL for h in SITES)
    assert value_ref.opens > presence_ref.opens and np.all([s.get("released_cells") is None for s in statuses[:-3]])
