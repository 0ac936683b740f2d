"""The nightly graph's ``secure_rounds`` asset over simulated nights: three sites, a released secure total
in each site's pooled table.

The Synthea fixture's export split by patient into three hospitals; each site's own graph up to its
published packets (network minimum cell size 3), then, night by night on a test clock that the DHT nodes
(127.0.0.1, in process) enforce the round windows on too, each site materialises ``secure_rounds`` for the
partition: presence round, value round, release into its ledger. The evidence asset then pools a cell
with 1 or 2 patients at every site, which no site could publish, as one secure total of three hospitals.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from dagster import RetryPolicy, materialize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dht"))
import test_rounds_site as site_rounds  # noqa: E402  (its choice of a cell small at every site)
from dht_cluster import LOOPBACK, Clock, certify_nodes, round_nodes_in_thread  # noqa: E402

from pipelines.assets import evidence_tables, fhir_extract, mapping_set, outcome_events, outcome_packets  # noqa: E402
from pipelines.assets.network import publish_asset  # noqa: E402
from pipelines.assets.secagg import rounds_asset  # noqa: E402
from pipelines.resources import DhtConfig, SiteConfig  # noqa: E402
from qis_fhir.mapping import load_mapping  # noqa: E402
from qis_fhir.outcomes.events import read_outcome_tables  # noqa: E402
from qis_fhir.packets.keys import create_site  # noqa: E402
from qis_fhir.packets.manifest import add_site, create_network, load_network  # noqa: E402
from qis_fhir.secagg.release import LEDGER_DIR, ReleaseLedger, round_refs, site_input  # noqa: E402
from qis_fhir.secagg.round import DAY, SCHEDULE  # noqa: E402
from qis_fhir.secagg.values import cell_figures, patient_rows, round_cells  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PARTITION = "2026-11-27"
SITES = site_rounds.SITES
MIN_CELL = site_rounds.MIN_CELL
NO_WAIT = RetryPolicy(max_retries=0)
_PATIENT = re.compile(rb'"reference":"Patient/([^"]+)"')


def _split_export(source: Path, dest: Path) -> None:
    """Each resource line to the hospital of its patient (by a hash of the patient id)."""
    for h in SITES:
        (dest / h).mkdir(parents=True)
    for path in sorted(source.glob("*.ndjson")):
        out = {h: [] for h in SITES}
        for line in path.read_bytes().splitlines(keepends=True):
            pid = json.loads(line)["id"].encode() if path.name.startswith("Patient.") else _PATIENT.search(line).group(1)
            out[SITES[hashlib.sha256(pid).digest()[0] % len(SITES)]].append(line)
        for h in SITES:
            (dest / h / path.name).write_bytes(b"".join(out[h]))


def _metadata(result, key: str) -> dict:
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def test_three_sites_nightly_rounds_put_a_secure_total_in_the_pooled_table(fixtures_dir, tmp_path, instance):
    from qis_fhir.evidence.pooling import CELL_KEYS

    _split_export(fixtures_dir / "synthea-r4-105", tmp_path / "exports")
    create_network(tmp_path / "net", network_id="nightly-split", min_cell_size=MIN_CELL)
    for h in SITES:
        create_site(h, tmp_path / "sites" / h)
        add_site(tmp_path / "net", tmp_path / "sites" / h)
    sites = {h: SiteConfig(export_dir=str(tmp_path / "exports" / h), out_root=str(tmp_path / "out" / h), site_dir=str(tmp_path / "sites" / h),
                           network_dir=str(tmp_path / "net")) for h in SITES}
    mapping = load_mapping(sites[SITES[0]].mapping_dir)
    clock = Clock(0.0)  # set below, once the cell is chosen; the nodes and the rounds asset read it
    secure_rounds = rounds_asset(NO_WAIT, clock)
    outs = {h: Path(sites[h].out_path(PARTITION)) for h in SITES}
    node_identities = certify_nodes(tmp_path / "net" / "manifest.json", 4)  # before any site reads the manifest
    with round_nodes_in_thread(tmp_path / "net" / "manifest.json", clock, node_identities, 3) as addresses:
        dht = DhtConfig(bootstrap=f"{LOOPBACK}:{addresses[0][1]}", bind=LOOPBACK)
        own = [mapping_set, fhir_extract, outcome_events, outcome_packets, publish_asset(NO_WAIT)]
        for h in SITES:
            assert materialize(own, partition_key=PARTITION, resources={"site": sites[h], "dht": dht}, instance=instance).success
        tables = {h: read_outcome_tables(outs[h], mapping) for h in SITES}
        events, units = {h: t["outcome_events"] for h, t in tables.items()}, {h: t.get("control_units") for h, t in tables.items()}
        measure, period, cell = site_rounds._small_everywhere(events, units, mapping)
        presence, value = round_refs(load_network(tmp_path / "net").manifest.network_id, mapping, measure, period)

        nights = {h: [] for h in SITES}
        for night in range(15):  # noon of each day: presence days 0-6, its unmasking and the value round days 7-13, unmask day 14
            clock.t = SCHEDULE.starts(presence.opens) + night * DAY + DAY / 2
            for h in SITES:
                done = materialize([secure_rounds], partition_key=PARTITION, resources={"site": sites[h], "dht": dht}, instance=instance)
                nights[h].append(_metadata(done, "secure_rounds"))
        pooled = {}
        for h in SITES:
            done = materialize([evidence_tables], partition_key=PARTITION, resources={"site": sites[h], "dht": dht}, instance=instance)
            pooled[h] = pd.read_parquet(outs[h] / "evidence" / "pooled_outcomes.parquet")

    for h in SITES:
        # what the UI shows each night: the first night advertises the presence round of the pair, the
        # night the value round is unmasked releases it, no night before releases anything
        first, last = nights[h][0], nights[h][-1]
        assert first["rounds_due"] >= 1 and first["steps"].get("presence:advertise", 0) >= 1
        assert [n["rounds_released"] for n in nights[h][:-1]] == [0] * 14 and last["rounds_released"] >= 1
        assert last["steps"].get("value:unmask", 0) == last["rounds_released"] and last["cells_released"] >= 1
        assert not any(n["rounds_aborted"] for n in nights[h])

    bucket, band, sex, treatment = round_cells(mapping, measure)[cell]
    central = cell_figures(pd.concat([patient_rows(events[h], units[h], mapping, measure, period) for h in SITES]), round_cells(mapping, measure))[cell]
    for h in SITES:
        table = pooled[h]
        row = table[(table["condition"] == bucket) & (table["age_band"] == band) & (table["sex"] == sex) & (table["treatment"] == treatment)
                    & (table["measure"] == measure) & (table["period"] == period)]
        assert len(row) == 1, h
        # the secure total of the three hospitals, and only it: no site could publish the cell
        assert (int(row["patients"].iloc[0]), int(row["sites"].iloc[0]), int(row["secure_sites"].iloc[0])) == (int(central[0]), 3, 3)
        assert "secure_total" in row["flags"].iloc[0].split(";")
        assert all(0 < int(site_input(events[s], units[s], mapping, measure, period, MIN_CELL).figures[cell, 0]) < MIN_CELL for s in SITES)
        # each site knows its patients are in that total: its packet stage never publishes the cell in the clear
        assert (bucket, band, sex, treatment, measure, period) in ReleaseLedger(tmp_path / "sites" / h / LEDGER_DIR).contributed_cells(mapping.version)
    for h in SITES[1:]:  # every member pooled the same network figures
        a, b = (pooled[x].set_index(CELL_KEYS).sort_index() for x in (SITES[0], h))
        assert (a["patients"] == b["patients"]).all()
