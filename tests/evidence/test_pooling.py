"""Pooling of the sites' figures: published reference results and equivalence with a central analysis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pooling_sim import counts_row, frame, site_row
from scipy import stats

from qis_fhir.evidence.pooling import CELL_KEYS, inverse_variance_re, pool, pool_cells, site_estimates

# BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg): vaccinated TB+, TB-, control TB+, TB-
BCG = np.array([
    [4, 119, 11, 128], [6, 300, 29, 274], [3, 228, 11, 209], [62, 13536, 248, 12619], [33, 5036, 47, 5761],
    [180, 1361, 372, 1079], [8, 2537, 10, 619], [505, 87886, 499, 87892], [29, 7470, 45, 7232],
    [17, 1699, 65, 1600], [186, 50448, 141, 27197], [5, 2493, 3, 2338], [27, 16886, 29, 17825],
], dtype=float)


def bcg_log_rr():
    a, b, c, d = BCG.T
    return np.log(a / (a + b)) - np.log(c / (c + d)), 1 / a - 1 / (a + b) + 1 / c - 1 / (c + d)


def test_dl_hksj_reproduce_metafor_on_the_bcg_trials():
    y, v = bcg_log_rr()
    res = inverse_variance_re(y, v)
    # metafor: rma(yi, vi, data=dat.bcg, method="DL") and test="knha"
    assert res.tau2[0] == pytest.approx(0.3088, abs=5e-5)
    assert res.i2[0] == pytest.approx(0.9212, abs=5e-5)
    assert res.q[0] == pytest.approx(152.2330, abs=5e-4)
    assert res.estimate[0] == pytest.approx(-0.7141, abs=5e-5)
    assert res.se[0] == pytest.approx(0.1787, abs=5e-5)
    assert res.se_hksj[0] == pytest.approx(0.1807, abs=5e-5)
    assert (res.lo[0], res.hi[0]) == pytest.approx((-1.108, -0.320), abs=5e-4)
    assert res.q_p[0] < 1e-20
    assert res.weight.sum() == pytest.approx(1.0)


def test_tau2_is_truncated_and_the_re_interval_never_narrower_than_the_fixed_effect_one():
    # studies agreeing better than chance: Q < k - 1, so the untruncated DL tau^2 is negative and the
    # plain HKSJ q < 1 would shrink the interval below the fixed-effect one
    y, v = np.array([0.10, 0.11, 0.09, 0.10]), np.array([0.04, 0.05, 0.03, 0.04])
    res = inverse_variance_re(y, v)
    assert res.q[0] < 3 and res.tau2[0] == 0.0 and res.i2[0] == 0.0
    assert res.se_hksj[0] == pytest.approx(res.fixed_se[0])
    z_half = stats.norm.ppf(0.975) * res.fixed_se[0]
    assert res.hi[0] - res.lo[0] >= 2 * z_half
    assert res.hi[0] - res.estimate[0] == pytest.approx(stats.t.ppf(0.975, 3) * res.fixed_se[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(1e-3, 10)), min_size=2, max_size=12))
def test_re_interval_contains_the_fixed_effect_interval_width(studies):
    y, v = (np.array(a) for a in zip(*studies))
    res = inverse_variance_re(y, v)
    assert res.tau2[0] >= 0
    assert res.hi[0] - res.lo[0] >= 2 * stats.norm.ppf(0.975) * res.fixed_se[0] * (1 - 1e-12)
    if len(y) >= 3:
        assert res.pi_lo[0] <= res.lo[0] and res.pi_hi[0] >= res.hi[0]


def test_groups_are_pooled_independently():
    y, v = bcg_log_rr()
    g = np.array([0, 1] * 6 + [1])
    both = inverse_variance_re(y, v, g)
    for code in (0, 1):
        alone = inverse_variance_re(y[g == code], v[g == code])
        for field in ("estimate", "lo", "hi", "tau2", "q", "i2", "pi_lo", "pi_hi"):
            assert getattr(both, field)[code] == pytest.approx(getattr(alone, field)[0], rel=1e-12)
        assert both.weight[g == code] == pytest.approx(alone.weight, rel=1e-12)


def _raw_sites(seed: int):
    rng = np.random.default_rng(seed)
    sizes = [12, 30, 1, 57, 8]
    shifts = [-4.0, -6.5, 0.0, -5.2, 1.0]
    return [rng.normal(s, 11.0, n).round(1) for n, s in zip(sizes, shifts)]


def test_continuous_pooled_mean_and_sd_equal_the_central_analysis_of_the_same_patients():
    raw = _raw_sites(3)
    rows = frame([site_row(c, c < -5, f"Hospital {chr(65 + i)}") for i, c in enumerate(raw)])
    cell = pool_cells(rows).iloc[0]
    everyone = np.concatenate(raw)
    assert cell["patients"] == len(everyone) and cell["responders"] == int((everyone < -5).sum())
    assert abs(cell["mean_pooled"] - everyone.mean()) <= cell["mean_tolerance"]
    assert cell["sd_pooled"] == pytest.approx(everyone.std(ddof=1), abs=1e-3)
    lo, hi = stats.t.interval(0.95, len(everyone) - 1, loc=everyone.mean(), scale=stats.sem(everyone))
    assert (cell["mean_pooled_lo"], cell["mean_pooled_hi"]) == pytest.approx((lo, hi), abs=1e-3)
    assert cell["resp_pooled"] == (everyone < -5).mean()


def test_mean_tolerance_bounds_the_rounding_and_is_tight():
    # every site's exact mean sits just below a rounding boundary, so every packet rounds down by ~0.5e-4
    exact = 1.00004999
    raw = [np.array([exact + 0.3, exact - 0.3, exact]), np.array([exact]), np.array([exact - 2.0, exact + 2.0])]
    rows = frame([site_row(c, c > 0, f"Hospital {chr(65 + i)}") for i, c in enumerate(raw)])
    cell = pool_cells(rows).iloc[0]
    error = abs(cell["mean_pooled"] - np.concatenate(raw).mean())
    assert 0.99 * cell["mean_tolerance"] < error <= cell["mean_tolerance"]


def test_binary_pooled_proportion_has_the_wilson_interval():
    rows = frame([counts_row(40, 12, "Hospital A"), counts_row(25, 0, "Hospital B"), counts_row(60, 33, "Hospital C")])
    cell, per_site = pool(rows)
    cell = cell.iloc[0]
    ci = stats.binomtest(45, 125).proportion_ci(0.95, method="wilson")
    pooled = (cell["resp_pooled"], cell["resp_pooled_lo"], cell["resp_pooled_hi"])
    assert pooled == pytest.approx((45 / 125, ci.low, ci.high))
    b = per_site.set_index("site").loc["Hospital B"]
    ci_b = stats.binomtest(0, 25).proportion_ci(0.95, method="wilson")
    assert (b["resp"], b["resp_lo"], b["resp_hi"]) == pytest.approx((0.0, 0.0, ci_b.high))


def test_sites_without_a_spread_count_as_one_hospital_but_stay_out_of_the_between_hospital_mean():
    raw = _raw_sites(5)  # Hospital C has one patient: no SD
    raw.append(np.full(6, -3.0))  # Hospital F: six identical changes, SD 0: a variance of 0
    rows = frame([site_row(c, c < -5, f"Hospital {chr(65 + i)}") for i, c in enumerate(raw)])
    cells, per_site = pool(rows)
    cell = cells.iloc[0]
    assert cell["sites"] == 6 and cell["mean_re_sites"] == 4
    for site in ("Hospital C", "Hospital F"):
        c = per_site.set_index("site").loc[site]
        assert np.isnan(c["mean_weight"]) and c["resp_weight"] > 0
    assert np.isnan(per_site.set_index("site").loc["Hospital C", "mean_lo"])
    others = per_site[~per_site["site"].isin(["Hospital C", "Hospital F"])]
    alone = inverse_variance_re(others["mean"], others["sd"] ** 2 / others["patients"])
    assert cell["mean_re"] == pytest.approx(alone.estimate[0])
    assert others["mean_weight"].sum() == pytest.approx(1.0)
    assert cell["mean_pooled"] == pytest.approx(np.concatenate(raw).mean(), abs=cell["mean_tolerance"])


def test_cells_with_one_or_two_sites_leave_what_cannot_be_computed_empty():
    rows = frame([
        counts_row(40, 12, "Hospital A", treatment="TX_ONE"),
        counts_row(40, 12, "Hospital A", treatment="TX_TWO"), counts_row(50, 30, "Hospital B", treatment="TX_TWO"),
    ])
    cells = pool_cells(rows).set_index("treatment")
    one, two = cells.loc["TX_ONE"], cells.loc["TX_TWO"]
    for col in ("resp_re", "resp_re_lo", "resp_tau", "resp_i2", "resp_max_weight", "mean_re", "mean_tau", "mean_pi_lo"):
        assert np.isnan(one[col]), col
    assert pd.isna(one["resp_sites_outside"]) and pd.isna(one["mean_sites_outside"])
    assert one["resp_pooled"] == pytest.approx(0.3)
    assert not np.isnan(two["resp_re"]) and not np.isnan(two["mean_re"])
    assert np.isnan(two["resp_pi_lo"]) and np.isnan(two["mean_pi_lo"])  # prediction needs 3 sites


def test_a_site_far_from_the_others_is_counted_outside_and_a_huge_site_dominates():
    rows = frame([counts_row(80, 40, "Hospital A", mean=-5.0), counts_row(90, 47, "Hospital B", mean=-5.5),
                  counts_row(70, 34, "Hospital C", mean=-4.8), counts_row(85, 80, "Hospital D", mean=-25.0)])
    cell = pool_cells(rows).iloc[0]
    assert cell["resp_sites_outside"] >= 1 and cell["mean_sites_outside"] >= 1
    big = frame([counts_row(5000, 2500, "Hospital A", sd=10.0), counts_row(40, 20, "Hospital B"),
                 counts_row(40, 21, "Hospital C")])
    cell = pool_cells(big).iloc[0]
    assert cell["resp_max_weight"] > 0.9 and cell["mean_max_weight"] > 0.9


def test_output_has_one_row_per_cell_in_the_contract_columns():
    rows = frame([counts_row(40, 12, "Hospital A", sex=s, period=p, as_of=d)
                  for s in ("female", "male") for p in ("2024", "2024-Q1") for d in (20241101,)]
                 + [counts_row(30, 10, "Hospital B", sex="male", period="2024", as_of=20241201)])
    cells = pool_cells(rows)
    assert len(cells) == 4 and not cells.duplicated(CELL_KEYS).any()
    male = cells[(cells["sex"] == "male") & (cells["period"] == "2024")].iloc[0]
    assert (male["sites"], male["patients"], male["as_of_min"], male["as_of_max"]) == (2, 70, 20241101, 20241201)
    per_site = site_estimates(rows)
    assert len(per_site) == len(rows)
    for col in ("resp", "resp_lo", "resp_hi", "mean_lo", "mean_hi", "resp_weight", "mean_weight"):
        assert col in per_site.columns


@pytest.mark.parametrize("bad", [
    {"responders": 41}, {"patients": 0, "responders": 0}, {"sd": -1.0}, {"mean": float("nan")},
])
def test_impossible_site_rows_are_refused(bad):
    row = counts_row(40, 12, "Hospital A") | bad
    with pytest.raises(ValueError):
        pool_cells(frame([row, counts_row(30, 3, "Hospital B")]))


def test_a_site_twice_in_one_cell_is_refused():
    with pytest.raises(ValueError, match="repeat a site"):
        pool_cells(frame([counts_row(40, 12, "Hospital A"), counts_row(30, 3, "Hospital A")]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["TX_A", "TX_B", "TX_C"]), st.integers(1, 400), st.floats(0, 1),
                          st.floats(-50, 50), st.floats(0, 30)), min_size=1, max_size=25))
@example([("TX_A", 34, 1.0, 0.0, 0.0)])  # the Wilson upper bound at 100 % came out as 1 - 1e-16
def test_every_site_row_lands_in_exactly_one_cell_and_every_interval_holds_its_estimate(sites):
    rows = frame([counts_row(n, int(round(share * n)), f"Hospital {i:02d}", mean=round(m, 4), sd=round(sd, 4),
                             treatment=tx)
                  for i, (tx, n, share, m, sd) in enumerate(sites)])
    cells, per_site = pool(rows)
    assert cells["sites"].sum() == len(rows) == len(per_site)
    assert cells["patients"].sum() == rows["patients"].sum() and cells["responders"].sum() == rows["responders"].sum()
    for _, cell in cells.iterrows():
        assert cell["resp_pooled_lo"] <= cell["resp_pooled"] <= cell["resp_pooled_hi"]
        if cell["sites"] >= 2:
            assert cell["resp_re_lo"] <= cell["resp_re"] <= cell["resp_re_hi"]
            assert 0 <= cell["resp_max_weight"] <= 1 and 0 <= cell["resp_i2"] <= 1
        if cell["sites"] >= 3 and not np.isnan(cell["resp_pi_lo"]):
            assert cell["resp_pi_lo"] <= cell["resp_re_lo"] and cell["resp_pi_hi"] >= cell["resp_re_hi"]
        if cell["mean_re_sites"] >= 2:
            assert cell["mean_re_lo"] <= cell["mean_re"] <= cell["mean_re_hi"] and cell["mean_tau"] >= 0
    shares = per_site.groupby("treatment")[["resp_weight", "mean_weight"]].sum(min_count=1)
    multi = cells.set_index("treatment")
    for tx, row in shares.iterrows():
        if multi.loc[tx, "sites"] >= 2:
            assert row["resp_weight"] == pytest.approx(1.0)
        if multi.loc[tx, "mean_re_sites"] >= 2:
            assert row["mean_weight"] == pytest.approx(1.0)
