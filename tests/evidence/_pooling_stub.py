"""TEST DOUBLE of ``qis_fhir.evidence.pooling`` and ``qis_fhir.evidence.flags`` (not the library's).

The statistics helper writes the real modules in parallel; until they land, the collect tests that
need a pooled table install this double with :func:`install` (monkeypatching ``sys.modules``).
It fills the contract's columns with the simplest honest figures: sums, the patient-weighted mean,
Wilson intervals from scipy, t intervals; every between-hospital figure is NaN. The tests that use
it assert only what any correct pooling gives (sums of patients and responders, the weighted mean
within the rounding bound), so they stay valid when the merge replaces this file's role with the
real modules (``install`` does nothing once they exist).
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pandas as pd
from scipy import stats

CELL_KEYS = ["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version"]
NAN_COLUMNS = [
    "resp_re", "resp_re_lo", "resp_re_hi", "resp_pi_lo", "resp_pi_hi", "resp_tau", "resp_i2", "resp_q", "resp_q_p",
    "resp_max_weight", "mean_re", "mean_re_lo", "mean_re_hi", "mean_pi_lo", "mean_pi_hi", "mean_tau", "mean_i2",
    "mean_q", "mean_q_p", "mean_max_weight",
]


def _wilson(r: int, n: int, level: float) -> tuple[float, float]:
    ci = stats.binomtest(int(r), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _t(mean: float, sd: float, n: int, level: float) -> tuple[float, float]:
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def pool_cells(site_rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    out = []
    for key, g in site_rows.groupby(CELL_KEYS, sort=True):
        n, r = int(g["patients"].sum()), int(g["responders"].sum())
        mean = float((g["patients"] * g["mean"]).sum() / n)
        within = float(((g["patients"] - 1) * g["sd"] ** 2).sum())
        between = float((g["patients"] * (g["mean"] - mean) ** 2).sum())
        sd = math.sqrt((within + between) / (n - 1)) if n > 1 else 0.0
        lo, hi = _wilson(r, n, level)
        mlo, mhi = _t(mean, sd, n, level)
        row = dict(zip(CELL_KEYS, key))
        row.update(sites=len(g), patients=n, responders=r, as_of_min=int(g["as_of"].min()), as_of_max=int(g["as_of"].max()),
                   resp_pooled=r / n, resp_pooled_lo=lo, resp_pooled_hi=hi, mean_pooled=mean, sd_pooled=sd,
                   mean_pooled_lo=mlo, mean_pooled_hi=mhi, mean_tolerance=0.5e-4,
                   resp_sites_outside=0, mean_sites_outside=0)
        row.update({c: np.nan for c in NAN_COLUMNS})
        out.append(row)
    return pd.DataFrame(out)


def site_estimates(site_rows: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    out = site_rows.copy()
    out["resp"] = out["responders"] / out["patients"]
    bounds = [_wilson(r, n, level) for r, n in zip(out["responders"], out["patients"])]
    out["resp_lo"], out["resp_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    tb = [_t(m, s, n, level) for m, s, n in zip(out["mean"], out["sd"], out["patients"])]
    out["mean_lo"], out["mean_hi"] = [b[0] for b in tb], [b[1] for b in tb]
    out["resp_weight"] = np.nan
    out["mean_weight"] = np.nan
    return out


def rank_and_flag(pooled: pd.DataFrame, per_site: pd.DataFrame) -> pd.DataFrame:
    out = pooled.copy()
    group = ["condition", "age_band", "sex", "measure", "period", "mapping_version"]
    out["rank"] = out.groupby(group)["resp_pooled"].rank(ascending=False, method="first").astype("int64")
    out["rank_basis"] = "pooled proportion"
    out["flags"] = "observational"
    return out


def install(monkeypatch) -> None:
    """Make ``qis_fhir.evidence.pooling`` and ``.flags`` resolve to this double for one test, unless
    the real modules are there (then the tests run against them and this does nothing)."""
    import importlib.util

    if importlib.util.find_spec("qis_fhir.evidence.pooling") and importlib.util.find_spec("qis_fhir.evidence.flags"):
        return
    pooling = types.ModuleType("qis_fhir.evidence.pooling")
    pooling.pool_cells, pooling.site_estimates = pool_cells, site_estimates
    flags = types.ModuleType("qis_fhir.evidence.flags")
    flags.rank_and_flag, flags.FLAG_TEXT = rank_and_flag, {"observational": "Observational data."}
    monkeypatch.setitem(sys.modules, "qis_fhir.evidence.pooling", pooling)
    monkeypatch.setitem(sys.modules, "qis_fhir.evidence.flags", flags)
