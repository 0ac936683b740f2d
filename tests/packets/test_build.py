"""Outcome events -> packets: aggregation, small-cell suppression, no differencing, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qis_fhir.errors import MappingError
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.packets.build import build_packets, read_packets, write_disclosure_report, write_packets
from qis_fhir.packets.codec import decode_packet, encode_packet
from qis_fhir.packets.keys import create_site
from qis_fhir.packets.manifest import add_site, create_network, load_network
from qis_fhir.packets.release import open_release
from qis_fhir.packets.verifier import Verifier
from qis_fhir.privacy.fingerprint import Fingerprinter


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(MAPPINGS_ROOT / "v1")  # change events only: control packets are test_build_control's


COLUMNS = ["event_id", "patient_key", "bucket", "treatment_code", "measure", "start", "start_period", "age_band", "sex",
           "baseline_value", "baseline_days", "followup_value", "followup_days", "change", "responded", "mapping_version", "mapping_hash"]


def make_events(cells: dict[tuple, int], *, seed: int = 0, start_period: str = "2024-03") -> pd.DataFrame:
    """``cells``: (bucket, age_band, sex, treatment, measure) -> number of distinct patients."""
    rng = np.random.default_rng(seed)
    rows = []
    pid = 0
    for (bucket, age, sex, tx, measure), n in cells.items():
        for _ in range(n):
            change = float(rng.normal(-1, 2))
            rows.append(
                dict(event_id=f"ev{pid}", patient_key=f"{pid:032x}", bucket=bucket, treatment_code=tx, measure=measure,
                     start=pd.Timestamp(f"{start_period}-15", tz="UTC"), start_period=start_period, age_band=age, sex=sex,
                     baseline_value=8.0, baseline_days=3, followup_value=8.0 + change, followup_days=90, change=change,
                     responded=change <= -0.5, mapping_version="v1", mapping_hash="h")
            )
            pid += 1
    return pd.DataFrame(rows, columns=COLUMNS)


BIG = ("type2_diabetes", "40-64", "female", "TX_0001", "hba1c")
SMALL = ("type2_diabetes", "40-64", "male", "TX_0001", "hba1c")


def test_counts_and_statistics(net, mapping):
    events = make_events({BIG: 30})
    b = build_packets(events, mapping, net.site_a, net.network, release_state=None, seq=20240401)
    (p,) = b.packets
    assert (p.patients, p.responders, p.period, p.treatment, p.measure, p.seq) == (30, int(events.responded.sum()), "2024", "TX_0001", "hba1c", 20240401)
    assert p.mean_change == pytest.approx(events.change.mean(), abs=1e-4)
    assert p.sd_change == pytest.approx(events.change.std(ddof=1), abs=1e-4)
    assert p.fingerprint == Fingerprinter(net.network.secret, "v1")("type2_diabetes", "40-64", "female")
    assert Verifier(net.manifest).verify(encode_packet(p)).reason == "ok"


def test_small_cells_are_suppressed_and_reported(net, mapping):
    b = build_packets(make_events({BIG: 11, SMALL: 10}), mapping, net.site_a, net.network, release_state=None, seq=1)
    assert [p.patients for p in b.packets] == [11]
    r = b.disclosure_report
    assert r["cells"] == {"published": 1, "suppressed": 1, "held": 0, "in_secure_total": 0}
    assert r["by_bucket"] == {"type2_diabetes": {"published": 1, "suppressed": 1, "held": 0, "in_secure_total": 0}}
    assert r["min_cell_size"] == 11
    # the report says nothing finer than per-bucket counts
    assert set(r) == {"format", "mapping_version", "min_cell_size", "granularity", "period", "seq", "cells", "by_bucket"}
    assert "male" not in orjson.dumps(r).decode().replace("female", "")


def test_a_patient_counts_once_per_cell(net, mapping):
    events = make_events({BIG: 11})
    second = events.iloc[:5].copy()  # five patients with a second episode in the same year
    second["event_id"] = [f"again{i}" for i in range(5)]
    second["start"] = second["start"] + pd.Timedelta(days=60)
    second["change"] = 100.0
    second.index = events.index[:5]  # repeated index labels, as pd.concat leaves them
    b = build_packets(pd.concat([events, second]), mapping, net.site_a, net.network, release_state=None, seq=1)
    assert b.packets[0].patients == 11
    assert b.packets[0].mean_change == pytest.approx(events.change.mean(), abs=1e-4)  # earliest episode kept


def test_period_granularity_follows_the_mapping(net, mapping):
    events = make_events({BIG: 12}, start_period="2024-05")
    for granularity, expected in (("month", "2024-05"), ("quarter", "2024-Q2"), ("year", "2024")):
        m = dataclasses.replace(mapping, cohorts=dataclasses.replace(mapping.cohorts, period=granularity))
        b = build_packets(events, m, net.site_a, net.network, release_state=None, seq=1)
        assert [p.period for p in b.packets] == [expected]
        assert b.disclosure_report["period"] == granularity


def test_rerun_is_byte_identical_and_ids_stable_across_seq(net, mapping, tmp_path):
    events = make_events({BIG: 20, SMALL: 14, ("hypertension", "65+", "male", "TX_0002", "systolic_bp"): 15})
    one = build_packets(events, mapping, net.site_a, net.network, release_state=None, seq=20240401)
    two = build_packets(events.sample(frac=1, random_state=3), mapping, net.site_a, net.network, release_state=None, seq=20240401)
    write_packets(tmp_path / "1.ndjson", one.packets)
    write_packets(tmp_path / "2.ndjson", two.packets)
    assert (tmp_path / "1.ndjson").read_bytes() == (tmp_path / "2.ndjson").read_bytes()
    later = build_packets(events, mapping, net.site_a, net.network, release_state=None, seq=20240402)
    assert [p.packet_id for p in later.packets] == [p.packet_id for p in one.packets]
    # a consumer that saw both runs keeps one packet per id: nothing counts twice
    v = Verifier(net.manifest)
    reasons = [v.verify(w).reason for w in read_packets(tmp_path / "1.ndjson") + read_packets(tmp_path / "2.ndjson")]
    assert reasons == ["ok"] * 3 + ["duplicate"] * 3


def test_packet_file_round_trip_and_report_file(net, mapping, tmp_path):
    b = build_packets(make_events({BIG: 12}), mapping, net.site_a, net.network, release_state=None, seq=1)
    write_packets(tmp_path / "p.ndjson", b.packets)
    assert [decode_packet(w) for w in read_packets(tmp_path / "p.ndjson")] == b.packets
    write_disclosure_report(tmp_path / "d.json", b.disclosure_report)
    assert orjson.loads((tmp_path / "d.json").read_bytes()) == b.disclosure_report


def test_empty_events_give_no_packets(net, mapping):
    b = build_packets(make_events({}), mapping, net.site_a, net.network, release_state=None, seq=1)
    assert b.packets == [] and b.disclosure_report["cells"] == {"published": 0, "suppressed": 0, "held": 0, "in_secure_total": 0}


def test_events_of_another_mapping_version_are_refused(net, mapping):
    events = make_events({BIG: 12})
    events.loc[0, "mapping_version"] = "v0"
    with pytest.raises(MappingError):
        build_packets(events, mapping, net.site_a, net.network, release_state=None, seq=1)


def _fresh_site(tmp_path, **network_options):
    """A one-site network of its own: for release state in the site directory, or other network options."""
    create_network(tmp_path / "n", network_id="hold", **network_options)
    site = create_site("s", tmp_path / "s")
    add_site(tmp_path / "n", tmp_path / "s")
    return site, load_network(tmp_path / "n")


def test_the_manifest_min_cell_size_governs(tmp_path, mapping):
    site, network = _fresh_site(tmp_path, min_cell_size=5)
    b = build_packets(make_events({BIG: 5, SMALL: 4}), mapping, site, network, seq=1)
    assert [p.patients for p in b.packets] == [5]


cell_strategy = st.dictionaries(
    st.tuples(
        st.sampled_from(["type2_diabetes", "hypertension"]),
        st.sampled_from(["18-39", "40-64", "65+"]),
        st.sampled_from(["female", "male", "unknown"]),
        st.sampled_from(["TX_0001", "TX_0002"]),
        st.sampled_from(["hba1c", "systolic_bp"]),
    ),
    st.integers(1, 25),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=cell_strategy)
def test_no_published_number_includes_a_suppressed_patient(net, mapping, cells):
    """The differencing guarantee: every published packet counts exactly the patients of its own
    complete cell, so no sum or difference of published packets involves a suppressed cell's
    patients, and no published cohort is the union of others (all fingerprints are complete,
    distinct cohorts at one granularity)."""
    events = make_events(cells)
    b = build_packets(events, mapping, net.site_a, net.network, release_state=None, seq=1)
    fp = Fingerprinter(net.network.secret, "v1")
    by_fp = {fp(bu, a, s): (bu, a, s) for bu in ("type2_diabetes", "hypertension") for a in ("18-39", "40-64", "65+") for s in ("female", "male", "unknown")}
    published = set()
    for p in b.packets:
        bucket, age, sex = by_fp[p.fingerprint]  # a complete cohort: never a margin or total
        cell = (bucket, age, sex, p.treatment, p.measure)
        assert cell not in published
        published.add(cell)
        assert p.patients == cells[cell] >= 11  # its own cell's patients and nobody else's
    assert published == {c for c, n in cells.items() if n >= 11}
    assert b.disclosure_report["cells"]["suppressed"] == sum(1 for n in cells.values() if n < 11)
    suppressed_patients = sum(n for n in cells.values() if n < 11)
    assert sum(p.patients for p in b.packets) == len(events) - suppressed_patients


def released(events, mapping, site, network, day):
    """One committed release of ``events`` for ``day`` under the site's release state."""
    with open_release(site, day) as release:
        return build_packets(events, mapping, site, network, release_state=release)


def test_small_changes_between_releases_are_held_back(tmp_path, mapping):
    """Differencing over time: night 1 publishes 12 patients; night 2 has 13 (one new patient). Publishing
    both would reveal the new patient's change (13*mean2 - 12*mean1). The builder re-emits night 1's packet
    until at least min_cell_size patients changed."""
    site, network = _fresh_site(tmp_path)
    events = make_events({BIG: 30}, seed=5)
    night1 = released(events.iloc[:12], mapping, site, network, "2024-01-01")
    assert (site.site_dir / "released_packets.ndjson").exists()
    night2 = released(events.iloc[:13], mapping, site, network, "2024-01-02")
    assert night2.packets == night1.packets  # byte-identical: consumers see a duplicate
    assert night2.disclosure_report["cells"] == {"published": 1, "suppressed": 0, "held": 1, "in_secure_total": 0}
    night3 = released(events.iloc[:22], mapping, site, network, "2024-01-03")  # 10 changed since release
    assert night3.packets == night1.packets
    night4 = released(events.iloc[:23], mapping, site, network, "2024-01-04")  # 11 changed: release
    (p,) = night4.packets
    assert (p.patients, p.seq) == (23, 2024010400)
    assert p.packet_id == night1.packets[0].packet_id
    night5 = released(events.iloc[:24], mapping, site, network, "2024-01-05")  # measured from night 4
    assert night5.packets == night4.packets


def test_a_cell_that_reaches_the_threshold_is_released_at_once(tmp_path, mapping):
    site, network = _fresh_site(tmp_path)
    events = make_events({BIG: 12}, seed=6)
    assert released(events.iloc[:10], mapping, site, network, "2024-01-01").packets == []
    assert [p.patients for p in released(events, mapping, site, network, "2024-01-02").packets] == [12]


def test_rerun_with_release_state_is_still_identical(tmp_path, mapping):
    site, network = _fresh_site(tmp_path)
    events = make_events({BIG: 20, SMALL: 15}, seed=7)
    one = released(events, mapping, site, network, "2024-01-03")
    two = released(events, mapping, site, network, "2024-01-03")
    assert one.packets == two.packets
    assert two.disclosure_report["cells"]["held"] == 2


def test_corrupt_release_state_is_a_clear_error(tmp_path, mapping):
    from qis_fhir.errors import QisError

    site, network = _fresh_site(tmp_path)
    (site.site_dir / "released_packets.ndjson").write_text("garbage\n")
    with pytest.raises(QisError, match="released_packets.ndjson:1"):
        released(make_events({BIG: 12}), mapping, site, network, "2024-01-01")


def test_a_cell_this_site_put_in_a_released_secure_total_is_not_published_in_the_clear(net, mapping, tmp_path):
    """Late data lift a cell the site summed in a released secure total to the minimum cell size: a clear
    packet of it would count its patients twice in the pooled figure, so it stays out, counted in the
    report. A cell of the same release the site had no patients in is published as usual."""
    from qis_fhir.secagg.release import RELEASE_COLUMNS, ReleaseLedger
    from qis_fhir.secagg.round import RoundRef

    other = ("type2_diabetes", "65+", "female", "TX_0001", "hba1c")
    release = pd.DataFrame([(*cell[:4], "hba1c", "2024", "v1", 3, 12, 5, 12, -0.5, 1.0, 20250101) for cell in (BIG, other)],
                           columns=["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version", *RELEASE_COLUMNS])
    ledger = ReleaseLedger(tmp_path / "ledger")
    ledger.record(RoundRef("test-net", "v1", "hba1c", "2024", "value", "2025-02-05"), release, np.array([True, False]))
    assert ledger.contributed_cells("v1") == {(*BIG[:4], "hba1c", "2024")} and ledger.contributed_cells("v2") == set()

    b = build_packets(make_events({BIG: 30, other: 12}), mapping, net.site_a, net.network, release_state=None, seq=1,
                      in_secure_totals=ledger.contributed_cells("v1"))
    assert [(p.patients, p.fingerprint) for p in b.packets] == [(12, Fingerprinter(net.network.secret, "v1")(*other[:3]))]
    assert b.disclosure_report["cells"] == {"published": 1, "suppressed": 0, "held": 0, "in_secure_total": 1}
