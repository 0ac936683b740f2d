"""Rank treatments within a cohort and flag what a clinician should know before trusting a figure.

``rank_and_flag(pooled, per_site)`` adds ``rank`` (1 = the best share among the treatments of the
same cohort, measure and period: the highest share of responders or controlled patients, the lowest
share poorly controlled where the row's ``response_direction`` is ``lower``), ``rank_basis`` and ``flags``: codes joined with
";" in the order of ``FLAG_ORDER``, each explained by one plain sentence in ``FLAG_TEXT``.
Thresholds and the cross-cohort test are in ``docs/evidence.md`` (Methods).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from qis_fhir.evidence.pooling import CELL_KEYS

#: the cohorts whose treatments are ranked against each other
RANK_GROUP = ["condition", "age_band", "sex", "measure", "period", "mapping_version"]
#: the same condition, treatment, measure and period across every age band and sex
CONDITION_GROUP = ["condition", "treatment", "measure", "period", "mapping_version"]

MIN_PATIENTS = 30
MIN_SITES = 3
HETEROGENEITY_I2 = 0.5  # I^2 above 50 % ...
HETEROGENEITY_Q_P = 0.10  # ... or Cochran's Q test below 0.10 (Q has little power with few hospitals)
DOMINANT_SHARE = 0.5
OLDER_DATA_DAYS = 31
#: a cohort "contradicts" its condition when Fisher's exact test of its responders against those of the
#: condition's other cohorts (same treatment, measure, period) gives p < CONTRADICTION_ALPHA AND the two
#: shares differ by at least CONTRADICTION_MIN_DIFF (20 percentage points): clear enough to act on,
#: large enough that a few points' drift between cohorts is not flagged
CONTRADICTION_ALPHA = 0.01
CONTRADICTION_MIN_DIFF = 0.20

FLAG_ORDER = [
    "one_site", "under_30_patients", "under_3_sites", "heterogeneous", "dominant_site", "site_disagrees",
    "contradicts_condition", "all_responded", "none_responded", "older_data", "prevalent_users", "observational",
]
#: measure kinds whose cells compare prevalent users (``prevalent_users``)
CONTROL_KINDS = ("control", "poor_control")
FLAG_TEXT = {
    "one_site": "Only one hospital reported this: its result may reflect that hospital's patients and practice.",
    "under_30_patients": "Fewer than 30 patients in total: the figures can move a lot with a few more patients.",
    "under_3_sites": "Only two hospitals reported this: too few to judge how much hospitals differ.",
    "heterogeneous": "Hospitals' results differ more than chance alone would explain.",
    "dominant_site": "One hospital carries more than half of the weight of the between-hospital estimate.",
    "site_disagrees": "At least one hospital's own result is clearly different from the combined estimate.",
    "contradicts_condition": "Patients of this age group and sex respond clearly differently to this treatment "
                             "than other patients with the same condition.",
    "all_responded": "Every patient responded: with so uniform a result, check how the response is defined.",
    "none_responded": "No patient responded.",
    "older_data": "Some hospitals' figures are more than a month older than the newest figures.",
    "prevalent_users": "Compares patients already on treatment, not new starts; who gets which treatment depends "
                       "on how ill they are, so differences are not effects of the treatments.",
    "observational": "Routine care records, not a randomised trial: patients were not assigned treatments "
                     "at random, so differences between treatments may reflect who received them.",
}
RANK_BASIS_RE = "between-hospital estimate"
RANK_BASIS_POOLED = "pooled proportion"


def contradiction_test(pooled: pd.DataFrame) -> pd.DataFrame:
    """Per row: the share of responders in the condition's other cohorts, Fisher's p, and the verdict.

    Other cohorts = the rows with the same condition, treatment, measure, period and mapping version but
    another age band or sex, pooled. Rows without other cohorts get NaN and are not flagged.
    """
    n, r = pooled["patients"].to_numpy(dtype=float), pooled["responders"].to_numpy(dtype=float)
    grouped = pooled.groupby(CONDITION_GROUP, sort=False, dropna=False)
    rest_n = grouped["patients"].transform("sum").to_numpy(dtype=float) - n
    rest_r = grouped["responders"].transform("sum").to_numpy(dtype=float) - r
    p_value = np.full(len(pooled), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        rest_share = np.where(rest_n > 0, rest_r / rest_n, np.nan)
    for i in np.flatnonzero(rest_n > 0):
        table = [[r[i], n[i] - r[i]], [rest_r[i], rest_n[i] - rest_r[i]]]
        p_value[i] = stats.fisher_exact(table).pvalue
    diff = r / n - rest_share
    flagged = (p_value < CONTRADICTION_ALPHA) & (np.abs(diff) >= CONTRADICTION_MIN_DIFF)
    return pd.DataFrame({"rest_share": rest_share, "p_value": p_value, "flagged": flagged}, index=pooled.index)


def _as_date(yyyymmdd: pd.Series) -> pd.Series:
    return pd.to_datetime(yyyymmdd.astype("int64").astype(str), format="%Y%m%d")


def rank_and_flag(pooled: pd.DataFrame, per_site: pd.DataFrame) -> pd.DataFrame:
    """``pooled`` (from ``pool_cells``) plus ``rank``, ``rank_basis`` and ``flags``.

    The rank uses the between-hospital estimate where at least three hospitals reported (a typical
    hospital's result), else the pooled proportion; ties share the better rank. Higher is better unless
    the row's ``response_direction`` is ``lower`` (a poor-control share); without that column (or
    ``measure_kind``, which sets ``prevalent_users``) every row is a change cell. ``older_data`` compares
    each cell's oldest site figure with the newest ``as_of`` of any site in ``per_site``.
    """
    missing = [c for c in CELL_KEYS if c not in pooled.columns or c not in per_site.columns]
    if missing:
        raise ValueError(f"pooled and per-site tables need the cell columns; missing {missing}")
    table = pooled.copy()
    sites = table["sites"].to_numpy()
    use_re = sites >= MIN_SITES
    basis = np.where(use_re, table["resp_re"].to_numpy(dtype=float), table["resp_pooled"].to_numpy(dtype=float))
    lower = (table["response_direction"] == "lower").to_numpy() if "response_direction" in table else np.zeros(len(table), bool)
    table["rank"] = (pd.Series(np.where(lower, basis, -basis), index=table.index).groupby([table[c] for c in RANK_GROUP], dropna=False)
                     .rank(method="min", na_option="bottom").astype("int64"))
    table["rank_basis"] = np.where(use_re, RANK_BASIS_RE, RANK_BASIS_POOLED)

    def gt(col, bound):
        return table[col].to_numpy(dtype=float) > bound

    def lt(col, bound):
        return table[col].to_numpy(dtype=float) < bound

    def any_outside(col):
        return table[col].fillna(0).to_numpy(dtype=float) > 0

    newest = _as_date(per_site["as_of"]).max()
    age_days = (newest - _as_date(table["as_of_min"])).dt.days.to_numpy()
    checks = {
        "one_site": sites == 1,
        "under_30_patients": table["patients"].to_numpy() < MIN_PATIENTS,
        "under_3_sites": sites == 2,  # one_site says it for a single hospital
        "heterogeneous": gt("resp_i2", HETEROGENEITY_I2) | lt("resp_q_p", HETEROGENEITY_Q_P)
                         | gt("mean_i2", HETEROGENEITY_I2) | lt("mean_q_p", HETEROGENEITY_Q_P),
        "dominant_site": gt("resp_max_weight", DOMINANT_SHARE) | gt("mean_max_weight", DOMINANT_SHARE),
        "site_disagrees": any_outside("resp_sites_outside") | any_outside("mean_sites_outside"),
        "contradicts_condition": contradiction_test(table)["flagged"].to_numpy(),
        "all_responded": table["responders"].to_numpy() == table["patients"].to_numpy(),
        "none_responded": table["responders"].to_numpy() == 0,
        "older_data": age_days > OLDER_DATA_DAYS,
        "prevalent_users": table["measure_kind"].isin(CONTROL_KINDS).to_numpy() if "measure_kind" in table
                           else np.zeros(len(table), dtype=bool),
        "observational": np.ones(len(table), dtype=bool),
    }
    codes = np.array(FLAG_ORDER, dtype=object)
    mask = np.column_stack([np.asarray(checks[c], dtype=bool) for c in FLAG_ORDER]).reshape(len(table), len(codes))
    table["flags"] = [";".join(codes[row]) for row in mask]
    return table
