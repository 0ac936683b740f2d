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
#: large enough that a few points' drift between cohorts is not flagged. Cohorts that contradict are left
#: out of the others' reference, one at a time, fewer than half of the condition's cohorts
#: (``contradiction_test``).
CONTRADICTION_ALPHA = 0.01
CONTRADICTION_MIN_DIFF = 0.20

FLAG_ORDER = [
    "one_site", "under_30_patients", "under_3_sites", "heterogeneous", "dominant_site", "site_disagrees",
    "contradicts_condition", "secure_total", "all_responded", "none_responded", "older_data", "prevalent_users", "observational",
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
    "secure_total": "Includes hospitals too small to report this alone, pooled by secure aggregation: only their "
                    "combined total is known, so they cannot be compared with each other.",
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
    """Per row: the share of responders of its reference, Fisher's p against it, and the verdict.

    The reference is the pooled rows with the same condition, treatment, measure, period and mapping
    version but another age band or sex, less those that themselves contradict. Against all the others,
    a cohort the treatment fails drags their share down and ordinary cohorts share its flag: in 20
    synthetic networks it pulled the rest of hydrochlorothiazide for women 65+ (74 % responding) from 65 %
    to 50 %, and 8.9 % of the cohorts within 10 points of their condition's usual response were flagged
    (``tests/evidence/test_pooled_planted_effects.py``; 2.2 % with this reference). So the contradicting cohorts
    are deleted from the reference one at a time, each condition's most significant first (smallest p,
    then largest difference), every cohort retested after each, until none still in the reference
    contradicts or one more would leave out half of the condition's cohorts: the usual response is what
    most cohorts show (of two cohorts that differ both are flagged, neither is usual). Deletions are never
    undone, so the loop ends. A cohort left out is judged against the final reference like any other.
    ``p_value`` is NaN where the shares differ by less than ``CONTRADICTION_MIN_DIFF`` (the test would
    not change the verdict; most of the time it would take); rows without other cohorts get NaN in both
    and are not flagged.
    """
    n, r = pooled["patients"].to_numpy(dtype=float), pooled["responders"].to_numpy(dtype=float)
    group = pooled.groupby(CONDITION_GROUP, sort=False, dropna=False).ngroup().to_numpy()
    groups = int(group.max()) + 1 if len(group) else 0
    may_leave_out = (np.bincount(group, minlength=groups) - 1) // 2  # per group: fewer than half
    left_out = np.zeros(len(pooled), dtype=bool)
    p_value = np.full(len(pooled), np.nan)
    retest = np.ones(len(pooled), dtype=bool)  # rows whose reference changed
    while True:
        kept_n, kept_r = np.where(left_out, 0.0, n), np.where(left_out, 0.0, r)
        rest_n = np.bincount(group, weights=kept_n, minlength=groups)[group] - kept_n
        rest_r = np.bincount(group, weights=kept_r, minlength=groups)[group] - kept_r
        with np.errstate(invalid="ignore", divide="ignore"):
            rest_share = np.where(rest_n > 0, rest_r / rest_n, np.nan)
        diff = r / n - rest_share
        far = np.abs(diff) >= CONTRADICTION_MIN_DIFF  # False where NaN: no other cohort
        p_value[retest] = np.nan
        for i in np.flatnonzero(retest & far):  # Fisher only where its verdict matters
            table = [[r[i], n[i] - r[i]], [rest_r[i], rest_n[i] - rest_r[i]]]
            p_value[i] = stats.fisher_exact(table).pvalue
        flagged = far & (p_value < CONTRADICTION_ALPHA)
        room = may_leave_out - np.bincount(group, weights=left_out, minlength=groups)
        candidates = np.flatnonzero(flagged & ~left_out & (room[group] > 0))
        if not len(candidates):
            break
        order = candidates[np.lexsort((-np.abs(diff[candidates]), p_value[candidates], group[candidates]))]
        _, first = np.unique(group[order], return_index=True)  # each group's most significant candidate
        left_out[order[first]] = True
        retest = np.isin(group, group[order[first]])
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
    # a secure total is one study to the between-hospital model, however many hospitals it sums
    use_re = (sites >= MIN_SITES) & np.isfinite(table["resp_re"].to_numpy(dtype=float))
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
        "secure_total": table["secure_sites"].fillna(0).to_numpy() > 0 if "secure_sites" in table
                        else np.zeros(len(table), dtype=bool),
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
