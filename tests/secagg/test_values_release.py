"""Fixed-point figures and the release rules, over both rounds on a LocalBoard with hand-made patients."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from qis_fhir.errors import RoundRepeatedError, SecAggAbortedError
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR
from qis_fhir.packets.build import CELL_COLUMNS
from qis_fhir.secagg.local import LocalBoard, aggregate
from qis_fhir.secagg.protocol import RoundJournal
from qis_fhir.secagg.release import ReleaseLedger, clear_cells, round_refs
from qis_fhir.secagg.values import (
    SCALE,
    VALUE_BOUND,
    VALUE_FIELDS,
    SiteInput,
    cell_figures,
    decode_totals,
    mean_sd,
    quantise,
    round_cells,
    round_opens,
)

from .conftest import Sites

MIN_CELL = 11
MAPPING = load_mapping(MAPPINGS_ROOT / "v1")  # its change windows close early enough for rounds of past periods to be open
MEASURE, PERIOD = "systolic_bp", "2024"
CELLS = round_cells(MAPPING, MEASURE)


def rows_for(counts: dict[int, int], seed: int) -> pd.DataFrame:
    """Patient rows: ``counts[i]`` patients in CELLS[i], values with two decimals, negatives included."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in counts.items():
        b, band, sex, tx = CELLS[i]
        for _ in range(n):
            value = round(float(rng.normal(-8, 15)), 2) if rng.random() > 0.1 else float("nan")
            out.append((b, band, sex, tx, MEASURE, PERIOD, bool(rng.random() < 0.4), value))
    return pd.DataFrame(out, columns=[*CELL_COLUMNS, "responded", "value"])


def inputs_for(site_counts: dict[str, dict[int, int]]) -> tuple[dict[str, SiteInput], dict[str, pd.DataFrame]]:
    rows = {s: rows_for(c, seed) for seed, (s, c) in enumerate(site_counts.items())}
    inputs = {}
    for s, r in rows.items():
        fig = cell_figures(r, CELLS)
        inputs[s] = SiteInput(CELLS, fig, clear_cells(CELLS, fig, MIN_CELL))
    return inputs, rows


def run_both(sites: Sites, inputs, **kwargs):
    refs = round_refs("net-test", MAPPING, MEASURE, PERIOD)
    return asyncio.run(aggregate(inputs, sites.keys, sites.roster, refs, MIN_CELL, **kwargs))


def test_totals_equal_a_central_count_exactly_negative_sums_included():
    s = Sites(5)
    counts = {sid: {0: 4, 1: 3 + i, 7: 3} for i, sid in enumerate(s.ids)}
    inputs, rows = inputs_for(counts)
    result = run_both(s, inputs)
    central = cell_figures(pd.concat(rows.values()), CELLS)
    np.testing.assert_array_equal(result.decoded[:, 1:], central[result.eligible])
    assert list(result.eligible) == [0, 1, 7]
    assert (central[result.eligible, 3] < 0).all()  # the value sums are negative: two's complement held
    shown_cells = set(zip(result.table["condition"], result.table["age_band"], result.table["sex"], result.table["treatment"]))
    assert shown_cells == {CELLS[0], CELLS[1], CELLS[7]}
    row = result.table.iloc[0]
    values = pd.concat(rows.values())
    values = values[(values["bucket"] == CELLS[0][0]) & (values["age_band"] == CELLS[0][1]) & (values["sex"] == CELLS[0][2])
                    & (values["treatment_code"] == CELLS[0][3])]["value"].dropna()
    assert row["measured"] == len(values)
    assert row["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert row["sd"] == pytest.approx(values.std(ddof=1), rel=1e-12)


def test_a_cell_with_patients_at_fewer_than_m_sites_is_never_summed():
    s = Sites(5)
    # cell 2: patients at two sites only (9 + 9 = 18 patients, enough for the minimum cell size)
    counts = {sid: ({0: 3, 2: 9} if i < 2 else {0: 3}) for i, sid in enumerate(s.ids)}
    inputs, _ = inputs_for(counts)
    value_board = LocalBoard()
    result = run_both(s, inputs, boards=(LocalBoard(), value_board))
    assert int(result.presence.totals[2]) == 2
    assert list(result.eligible) == [0]
    # the value round's vectors hold one cell: cell 2's figures were never masked, let alone summed
    assert all(len(blob) == 32 + 8 * len(VALUE_FIELDS) + 64 for blob in value_board.messages["masked"].values())
    assert list(zip(result.table["condition"], result.table["age_band"], result.table["sex"], result.table["treatment"])) == [CELLS[0]]


def test_clear_published_cells_stay_out_of_the_secure_sum():
    """A site publishing a cell in the clear puts nothing of it in the masked sum, so subtracting its
    packet from the pooled figures leaves the secure total of the other sites, never one site's count."""
    s = Sites(4)
    counts = {"site-00": {0: 12}, "site-01": {0: 4}, "site-02": {0: 5}, "site-03": {0: 3}}
    inputs, rows = inputs_for(counts)
    assert inputs["site-00"].clear[0] and not inputs["site-01"].clear[0]
    assert int(inputs["site-00"].presence_vector()[0]) == 0
    result = run_both(s, inputs)
    others = cell_figures(pd.concat([rows[x] for x in ("site-01", "site-02", "site-03")]), CELLS)
    np.testing.assert_array_equal(result.decoded[0], [3, *others[0]])
    assert result.table["patients"].tolist() == [12]


def test_a_cell_released_in_the_clear_before_stays_out_even_when_now_small():
    fig = np.zeros((len(CELLS), 5), dtype=np.int64)
    fig[3, 0] = 4
    assert clear_cells(CELLS, fig, MIN_CELL, {CELLS[3]})[3]
    assert not clear_cells(CELLS, fig, MIN_CELL)[3]


def test_eligible_but_small_total_is_not_shown():
    s = Sites(3)
    inputs, _ = inputs_for({sid: {5: 2} for sid in s.ids})  # 3 sites, 6 patients < 11
    result = run_both(s, inputs)
    assert list(result.eligible) == [5] and result.decoded[0][1] == 6
    assert result.table.empty


def test_value_bound_is_refused_without_the_value():
    with pytest.raises(ValueError) as err:
        quantise(np.array([1.0, VALUE_BOUND + 0.5]))
    assert "10000.5" not in str(err.value)
    assert quantise(np.array([-1.235, 2.5 / SCALE])).tolist() == [-124, 2]  # half to even, as a central run


def test_totals_no_honest_sites_produce_are_refused():
    """A site that inflates responders beyond patients (or wraps the ring) makes totals that are refused."""
    good = np.array([3, 10, 4, 8, 100, 2000], dtype=np.int64)
    decode_totals(good.astype(np.uint64), 1)
    for field, bad_value in (("responders", 11), ("measured", 11), ("sum_sq", 10), ("patients", -1)):
        bad = good.copy()
        bad[VALUE_FIELDS.index(field)] = bad_value
        with pytest.raises(SecAggAbortedError):
            decode_totals(bad.astype(np.uint64), 1)


def test_mean_and_sd_from_fixed_point_sums():
    q = np.array([1234, -567, 890])
    mean, sd = mean_sd(3, int(q.sum()), int((q * q).sum()))
    assert mean == pytest.approx(q.mean() / SCALE, abs=1e-15)
    assert sd == pytest.approx(np.std(q / SCALE, ddof=1), rel=1e-13)


def test_one_release_per_measure_and_period(tmp_path):
    """Two releases over the same cells: the second round is refused at every site that took part in
    the first (its journal), even with one site's figures changed; and the ledger refuses other totals."""
    s = Sites(4)
    counts = {sid: {0: 4} for sid in s.ids}
    inputs, _ = inputs_for(counts)
    journals = {sid: RoundJournal(tmp_path / sid) for sid in s.ids}
    first = run_both(s, inputs, journals=journals)
    ledger = ReleaseLedger(tmp_path / "ledger")
    refs = round_refs("net-test", MAPPING, MEASURE, PERIOD)
    assert ledger.tables(MAPPING.version) is None
    ledger.record(refs[1], first.table)
    ledger.record(refs[1], first.table)  # the same release again (a report rebuilt) is fine
    pd.testing.assert_frame_equal(ledger.tables(MAPPING.version), first.table)  # what the evidence stage reads
    assert ledger.tables("v2") is None
    changed = dict(inputs)
    fig = inputs["site-01"].figures.copy()
    fig[0, 0] -= 1  # one patient fewer at one site: the difference would be that patient
    changed["site-01"] = SiteInput(CELLS, fig, inputs["site-01"].clear)
    with pytest.raises(RoundRepeatedError):
        run_both(s, changed, journals=journals)
    altered = first.table.assign(patients=first.table["patients"] - 1)
    with pytest.raises(RoundRepeatedError):
        ledger.record(refs[1], altered)
    # the same cells under another mapping version are the same patients: refused too
    other = refs[1].__class__(refs[1].network_id, "2.0.0", MEASURE, PERIOD, "value", refs[1].opens)
    with pytest.raises(RoundRepeatedError):
        ledger.record(other, altered)


def test_round_opens_after_the_last_follow_up_window():
    assert round_opens(MAPPING, MEASURE, "2024") == "2026-02-05"  # 2025-01-01 + 400 days
    assert round_opens(MAPPING, MEASURE, "2024-Q2") == "2025-08-05"  # 2024-07-01 + 400 days
    v2 = load_mapping(DEFAULT_MAPPING_DIR.parent / "v2")
    assert round_opens(v2, "bp_control", "2023") == "2024-01-01"
    cells = round_cells(v2, "bp_control")
    assert any(c[3] == v2.control_measures["bp_control"].untreated_code for c in cells)
    # the value round opens when the presence round is unmasked (its eligible cells are known only then):
    # one definition for every site, offline and over the DHT
    presence, value = round_refs("net-test", MAPPING, MEASURE, "2024")
    assert (presence.opens, value.opens, value.stage) == ("2026-02-05", "2026-02-12", "value")
