"""Control units (mapping v2) -> packets: denominator, numerator, the mean over patients with a reading."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from qis_fhir.errors import MappingError
from qis_fhir.mapping import load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.outcomes.control import UNIT_COLUMNS
from qis_fhir.outcomes.events import EVENT_COLUMNS
from qis_fhir.packets.build import build_packets
from qis_fhir.packets.codec import encode_packet
from qis_fhir.packets.verifier import Verifier
from qis_fhir.privacy.fingerprint import Fingerprinter

V2_DIR = DEFAULT_MAPPING_DIR.parent / "v2"


@pytest.fixture(scope="module")
def v2():
    return load_mapping(V2_DIR)


def units(rows: list[tuple], version: str = "v2") -> pd.DataFrame:
    """rows: (measure, treatment, year, age band, sex, index value or None, numerator)."""
    out = []
    for i, (measure, tx, year, band, sex, value, num) in enumerate(rows):
        out.append(dict(unit_id=f"u{i}", patient_key=f"{i:032x}", bucket="hypertension", measure=measure, treatment_code=tx,
                        period=year, age_band=band, sex=sex,
                        index_day=pd.Timestamp(f"{year}-11-01", tz="UTC") if value is not None else pd.NaT,
                        index_value=np.nan if value is None else value, values=[] if value is None else [value, 80.0],
                        numerator=num, mapping_version=version, mapping_hash="h"))
    return pd.DataFrame(out, columns=UNIT_COLUMNS)


def no_events(version: str = "v2") -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in EVENT_COLUMNS}).assign(mapping_version=pd.Series(dtype="object"))


def _cell(n_read: int, n_none: int, *, controlled: int, tx: str = "TX_0002", measure: str = "bp_control", year: str = "2023"):
    values = [130.0 + 2 * i for i in range(n_read)]
    rows = [(measure, tx, year, "40-64", "female", v, i < controlled) for i, v in enumerate(values)]
    rows += [(measure, tx, year, "40-64", "female", None, False)] * n_none
    return rows, values


def test_a_control_cell_carries_denominator_numerator_and_the_mean_of_those_with_a_reading(net, v2):
    rows, values = _cell(14, 6, controlled=5)
    u = units(rows)
    (p,) = build_packets(no_events(), v2, net.site_a, net.network, seq=20240110, release_state=None, units=u).packets
    assert (p.measure, p.treatment, p.period, p.patients, p.responders, p.measured) == ("bp_control", "TX_0002", "2023", 20, 5, 14)
    assert p.mean_change == pytest.approx(np.mean(values), abs=1e-4)  # over the 14 with a reading, not the 20
    assert p.sd_change == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert p.wire_version == 2 and p.mapping_version == "v2"
    assert p.fingerprint == Fingerprinter(net.network.secret, "v2")("hypertension", "40-64", "female")
    assert Verifier(net.manifest).verify(encode_packet(p)).reason == "ok"


def test_a_mean_of_fewer_than_the_minimum_cell_size_is_withheld(net, v2):
    rows, _ = _cell(10, 15, controlled=3)  # 25 in the denominator, 10 with a reading: under 11
    u = units(rows)
    (p,) = build_packets(no_events(), v2, net.site_a, net.network, seq=1, release_state=None, units=u).packets
    assert (p.patients, p.responders, p.measured, p.mean_change, p.sd_change) == (25, 3, 0, 0.0, 0.0)
    assert Verifier(net.manifest).verify(encode_packet(p)).ok


def test_a_small_denominator_is_suppressed_like_a_change_cell(net, v2):
    rows, _ = _cell(8, 2, controlled=1)
    u = units(rows)
    b = build_packets(no_events(), v2, net.site_a, net.network, seq=1, release_state=None, units=u)
    assert b.packets == [] and b.disclosure_report["cells"]["suppressed"] == 1


def test_control_cells_keep_the_measurement_year_whatever_the_change_granularity(net, tmp_path):
    """One period meaning per measure: quarters for change cells leave control cells by year."""
    mdir = tmp_path / "v2"
    shutil.copytree(V2_DIR, mdir)
    cohorts = mdir / "cohorts.yaml"
    cohorts.write_text(cohorts.read_text().replace("period: year", "period: quarter"))
    mapping = load_mapping(mdir)
    rows, _ = _cell(12, 0, controlled=4)
    u = units(rows)
    events = pd.DataFrame([dict(event_id=f"e{i}", patient_key=f"{100 + i:032x}", bucket="hypertension", treatment_code="TX_0002",
                                measure="systolic_bp", start=pd.Timestamp("2023-05-02", tz="UTC"), start_period="2023-05",
                                age_band="40-64", sex="female", baseline_value=150.0, baseline_days=3, followup_value=140.0,
                                followup_days=90, change=-10.0 + i, responded=i == 0, mapping_version="v2", mapping_hash="h")
                           for i in range(11)], columns=EVENT_COLUMNS)
    b = build_packets(events, mapping, net.site_a, net.network, seq=1, release_state=None, units=u)
    got = {(p.measure, p.period, p.wire_version) for p in b.packets}
    assert got == {("systolic_bp", "2023-Q2", 1), ("bp_control", "2023", 2)}


def test_a_v2_mapping_without_its_control_units_is_refused(net, v2):
    with pytest.raises(ValueError, match="control"):
        build_packets(no_events(), v2, net.site_a, net.network, seq=1, release_state=None)


def test_units_of_a_measure_the_mapping_does_not_declare_as_control_are_refused(net, v2):
    rows, _ = _cell(12, 0, controlled=4, measure="systolic_bp")
    with pytest.raises(MappingError, match="systolic_bp"):
        build_packets(no_events(), v2, net.site_a, net.network, seq=1, release_state=None, units=units(rows))


def test_units_of_another_mapping_version_are_refused(net, v2):
    rows, _ = _cell(12, 0, controlled=4)
    with pytest.raises(MappingError, match="another mapping version"):
        build_packets(no_events(), v2, net.site_a, net.network, seq=1, release_state=None, units=units(rows, "v1"))
