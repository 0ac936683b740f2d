"""Evidence tables for the report's tests: a small, realistic network result written as the contract's files.

Two conditions, three age bands, both sexes, three or four treatments each, one to five hospitals per
cell (so between-hospital figures are missing where fewer than 2 or 3 hospitals reported), one cohort
no hospital reported, one with fewer than 30 patients, a cell where everyone responded and one where
nobody did, one hospital whose data are two months older than the rest, and one condition and age
band reported for an earlier period too.

The tables are pooled with the stage's own ``pool_cells`` / ``site_estimates`` / ``rank_and_flag`` when
those modules are installed; until then with the thin stand-in below, which follows the contract's
columns and flag rules (its numbers need only be realistic: the report is tested against whatever the
tables say, read back from the files).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

CELL_KEYS = ["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version"]
SITES = ["Hospital A", "Hospital B", "Hospital C", "Hospital D", "Hospital E"]
LOCAL_SITE = "Hospital B"
REAL_SITE_IDS = {s: f"site-{s[-1].lower()}-infirmary-0{i}" for i, s in enumerate(SITES, 1)}
NEWEST, OLDER = 20241201, 20240930  # Hospital E's data are older than the rest
BANDS = {"18-39": 1, "40-64": 2, "65+": 3}
SEXES = ["female", "male"]
CONDITIONS = {
    "hypertension": {
        "display": "Essential (primary) hypertension", "measure": "systolic_bp", "measure_display": "Systolic blood pressure",
        "unit": "mm[Hg]", "change": -12.0, "sd": 11.0,
        "treatments": {"TX_0001": ("Hydrochlorothiazide oral tablet", 0.42), "TX_0002": ("Lisinopril oral tablet", 0.55),
                       "TX_0007": ("Amlodipine oral tablet", 0.50), "TX_0008": ("Losartan oral tablet", 0.47)},
    },
    "type2_diabetes": {
        "display": "Type 2 diabetes mellitus", "measure": "hba1c", "measure_display": "Hemoglobin A1c",
        "unit": "%", "change": -0.6, "sd": 0.8,
        "treatments": {"TX_0005": ("Metformin extended-release oral tablet", 0.48),
                       "TX_0006": ("Insulin isophane/regular human 70/30", 0.61),
                       "TX_0009": ("Sitagliptin oral tablet", 0.38)},
    },
}  # fmt: skip
EMPTY_COHORT = ("type2_diabetes", "18-39", "female")  # no hospital reported it
SMALL_COHORT = ("type2_diabetes", "18-39", "male")  # one treatment at one hospital, 12 patients
EARLIER_PERIOD = ("hypertension", "40-64", "2023")  # this condition and band also reported for 2023
DESIGN = "change from the last reading before a new treatment to the first reading after it"

FLAG_ORDER = ["one_site", "under_30_patients", "under_3_sites", "heterogeneous", "dominant_site", "site_disagrees",
              "contradicts_condition", "all_responded", "none_responded", "older_data", "observational"]  # fmt: skip
#: stand-in for qis_fhir.evidence.flags.FLAG_TEXT while that module is not installed
FALLBACK_FLAG_TEXT = {
    "one_site": "Only one hospital reported this treatment for this group.",
    "under_30_patients": "Fewer than 30 patients: the figures are imprecise.",
    "under_3_sites": "Fewer than 3 hospitals: the range expected at another hospital cannot be estimated.",
    "heterogeneous": "Hospitals' results differ more than chance alone would explain.",
    "dominant_site": "One hospital contributes more than half of the weight.",
    "site_disagrees": "At least one hospital's own result is clearly different from the combined result.",
    "contradicts_condition": "This result points the other way from the same treatment in other groups with this condition.",
    "all_responded": "Every patient responded: unusual, check before relying on it.",
    "none_responded": "No patient responded: unusual, check before relying on it.",
    "older_data": "Some hospitals' data are more than a month older than the newest.",
    "observational": "Observational data from routine care: not a randomised trial.",
}  # fmt: skip


def flag_text() -> dict[str, str]:
    try:
        from qis_fhir.evidence.flags import FLAG_TEXT
    except ImportError:
        return FALLBACK_FLAG_TEXT
    return FLAG_TEXT


def install_flag_text(monkeypatch) -> dict[str, str]:
    """Make ``qis_fhir.evidence.flags`` importable for write_report (the stand-in only when it is absent)."""
    try:
        import qis_fhir.evidence.flags  # noqa: F401
    except ImportError:
        module = types.ModuleType("qis_fhir.evidence.flags")
        module.FLAG_TEXT = FALLBACK_FLAG_TEXT
        monkeypatch.setitem(sys.modules, "qis_fhir.evidence.flags", module)
    return flag_text()


def site_rows(seed: int = 7) -> pd.DataFrame:
    """One row per hospital x cell, as the collect step builds them from verified summaries."""
    rng = np.random.default_rng(seed)
    rows = []
    for cond, c in CONDITIONS.items():
        for band in BANDS:
            for sex in SEXES:
                if (cond, band, sex) == EMPTY_COHORT:
                    continue
                treatments = list(c["treatments"].items())
                if (cond, band, sex) == SMALL_COHORT:
                    treatments = treatments[:1]
                for tx, (_, p) in treatments:
                    k = 1 if (cond, band, sex) == SMALL_COHORT else int(rng.integers(1, 6))
                    for site in sorted(rng.choice(SITES, size=k, replace=False)):
                        n = 12 if (cond, band, sex) == SMALL_COHORT else int(rng.integers(8, 70))
                        site_p = float(np.clip(p + rng.normal(0, 0.08), 0.02, 0.98))
                        changes = rng.normal(c["change"] * site_p / 0.5, c["sd"], size=n)
                        rows.append({
                            "condition": cond, "age_band": band, "sex": sex, "treatment": tx, "measure": c["measure"],
                            "period": "2024", "mapping_version": "v1", "site": str(site), "patients": n,
                            "responders": int(rng.binomial(n, site_p)), "mean": round(float(changes.mean()), 4),
                            "sd": round(float(changes.std(ddof=1)) if n > 1 else 0.0, 4),
                            "as_of": OLDER if site == "Hospital E" else NEWEST,
                        })  # fmt: skip
    df = pd.DataFrame(rows)
    # a cell where everyone responded and one where nobody did
    everyone = (df["condition"] == "hypertension") & (df["age_band"] == "18-39") & (df["treatment"] == "TX_0008")
    df.loc[everyone, "responders"] = df.loc[everyone, "patients"]
    nobody = (df["condition"] == "type2_diabetes") & (df["age_band"] == "65+") & (df["treatment"] == "TX_0009")
    df.loc[nobody, "responders"] = 0
    # one earlier period, for one age band of one condition: the report offers a choice of period there
    earlier = df[(df["condition"] == EARLIER_PERIOD[0]) & (df["age_band"] == EARLIER_PERIOD[1])].assign(period="2023")
    earlier["responders"] = (earlier["responders"] * 0.8).astype(int)
    earlier["mean"] = (earlier["mean"] * 0.9).round(4)
    return pd.concat([df, earlier], ignore_index=True)


# ------------------------------------------------------------------ stand-in pooling (tests only)


def _wilson(r, n, z):
    r, n = np.asarray(r, float), np.asarray(n, float)
    p = r / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def _dl(y, v, level):
    """DerSimonian-Laird: estimate, interval, prediction interval, tau, I2, Q, Q p, weight shares."""
    k = len(y)
    w = 1 / v
    fixed = np.sum(w * y) / np.sum(w)
    q = float(np.sum(w * (y - fixed) ** 2))
    tau2 = max(0.0, (q - (k - 1)) / (np.sum(w) - np.sum(w**2) / np.sum(w))) if k > 1 else 0.0
    wr = 1 / (v + tau2)
    mu = float(np.sum(wr * y) / np.sum(wr))
    se = float(np.sqrt(1 / np.sum(wr)))
    z = stats.norm.ppf(0.5 + level / 2)
    pi = (np.nan, np.nan)
    if k >= 3:
        t = stats.t.ppf(0.5 + level / 2, k - 2)
        pi = (mu - t * np.sqrt(tau2 + se**2), mu + t * np.sqrt(tau2 + se**2))
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return mu, mu - z * se, mu + z * se, pi, float(np.sqrt(tau2)), i2, q, float(stats.chi2.sf(q, k - 1)), wr / wr.sum()


def _stand_in_pool(rows: pd.DataFrame, level: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    z = stats.norm.ppf(0.5 + level / 2)
    expit = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    pooled, per_site = [], []
    for key, g in rows.groupby(CELL_KEYS, sort=True):
        g = g.sort_values("site")
        n, r = g["patients"].to_numpy(float), g["responders"].to_numpy(float)
        m, sd = g["mean"].to_numpy(float), g["sd"].to_numpy(float)
        k, big_n = len(g), n.sum()
        out = dict(zip(CELL_KEYS, key)) | {"sites": k, "patients": int(big_n), "responders": int(r.sum()),
                                           "as_of_min": int(g["as_of"].min()), "as_of_max": int(g["as_of"].max())}  # fmt: skip
        p, lo, hi = _wilson(r.sum(), big_n, z)
        out |= {"resp_pooled": float(p), "resp_pooled_lo": float(lo), "resp_pooled_hi": float(hi)}
        grand = float(np.sum(n * m) / big_n)
        sdp = float(np.sqrt((np.sum((n - 1) * sd**2) + np.sum(n * (m - grand) ** 2)) / (big_n - 1))) if big_n > 1 else 0.0
        tq = stats.t.ppf(0.5 + level / 2, big_n - 1) if big_n > 1 else np.nan
        out |= {"mean_pooled": grand, "sd_pooled": sdp, "mean_pooled_lo": grand - tq * sdp / np.sqrt(big_n),
                "mean_pooled_hi": grand + tq * sdp / np.sqrt(big_n), "mean_tolerance": 0.00005}  # fmt: skip
        sp, slo, shi = _wilson(r, n, z)
        resp_w = mean_w = np.full(k, np.nan)
        for kind, y, v in (("resp", np.log((r + 0.5) / (n - r + 0.5)), 1 / (r + 0.5) + 1 / (n - r + 0.5)),
                           ("mean", m, np.where(n > 1, sd**2 / n, np.nan))):  # fmt: skip
            ok = np.isfinite(v) & (v > 0)
            back = expit if kind == "resp" else (lambda x: x)
            if ok.sum() >= 2:
                mu, lo, hi, pi, tau, i2, q, qp, w = _dl(y[ok], v[ok], level)
                weights = np.full(k, np.nan)
                weights[ok] = w
                centre = float(back(mu))
                own_lo, own_hi = (slo, shi) if kind == "resp" else (m - z * np.sqrt(v), m + z * np.sqrt(v))
                outside = int(np.sum(ok & ((own_lo > centre) | (own_hi < centre))))
                out |= {f"{kind}_re": centre, f"{kind}_re_lo": float(back(lo)), f"{kind}_re_hi": float(back(hi)),
                        f"{kind}_pi_lo": float(back(pi[0])), f"{kind}_pi_hi": float(back(pi[1])), f"{kind}_tau": tau,
                        f"{kind}_i2": i2, f"{kind}_q": q, f"{kind}_q_p": qp, f"{kind}_max_weight": float(np.nanmax(weights)),
                        f"{kind}_sites_outside": outside}  # fmt: skip
            else:
                weights = np.where(ok, 1.0, np.nan) if k == 1 else np.full(k, np.nan)
                out |= {f"{kind}_{s}": np.nan for s in ("re", "re_lo", "re_hi", "pi_lo", "pi_hi", "tau", "i2", "q", "q_p")}
                out |= {f"{kind}_max_weight": 1.0, f"{kind}_sites_outside": 0}
            if kind == "resp":
                resp_w = weights
            else:
                mean_w = weights
        pooled.append(out)
        tq_site = np.where(n > 1, stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)), np.nan)
        per_site.append(g.assign(resp=sp, resp_lo=slo, resp_hi=shi, mean_lo=np.where(n > 1, m - tq_site * sd / np.sqrt(n), np.nan),
                                 mean_hi=np.where(n > 1, m + tq_site * sd / np.sqrt(n), np.nan),
                                 resp_weight=resp_w if k > 1 else 1.0, mean_weight=mean_w if k > 1 else 1.0))  # fmt: skip
    return pd.DataFrame(pooled), pd.concat(per_site, ignore_index=True)


def _stand_in_rank_and_flag(pooled: pd.DataFrame) -> pd.DataFrame:
    df = pooled.copy()
    use_re = (df["sites"] >= 3) & df["resp_re"].notna()
    basis = np.where(use_re, df["resp_re"], df["resp_pooled"])
    df["rank_basis"] = np.where(use_re, "between-hospital estimate", "pooled proportion")
    df["_basis"] = basis
    group = ["condition", "age_band", "sex", "measure", "period", "mapping_version"]
    df["rank"] = df.groupby(group)["_basis"].rank(ascending=False, method="first").astype(int)
    newest = df["as_of_max"].max()
    newest_date = pd.to_datetime(str(newest))
    flags = []
    for row in df.itertuples(index=False):
        codes = {
            "one_site": row.sites == 1,
            "under_30_patients": row.patients < 30,
            "under_3_sites": row.sites < 3,
            "heterogeneous": (row.resp_i2 > 0.5) or (row.resp_q_p < 0.10),
            "dominant_site": row.sites > 1 and row.resp_max_weight > 0.5,
            "site_disagrees": row.resp_sites_outside > 0,
            "contradicts_condition": False,
            "all_responded": row.responders == row.patients,
            "none_responded": row.responders == 0,
            "older_data": (newest_date - pd.to_datetime(str(row.as_of_min))).days > 31,
            "observational": True,
        }
        flags.append(";".join(c for c in FLAG_ORDER if codes[c]))
    df["flags"] = flags
    return df.drop(columns="_basis")


def pool(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ranked and flagged pooled table, per-site table): the stage's functions when installed."""
    try:
        from qis_fhir.evidence.flags import rank_and_flag
        from qis_fhir.evidence.pooling import pool_cells, site_estimates
    except ImportError:
        pooled, per_site = _stand_in_pool(rows)
        return _stand_in_rank_and_flag(pooled), per_site
    per_site = site_estimates(rows, level=0.95)
    return rank_and_flag(pool_cells(rows, level=0.95), per_site), per_site


def write_evidence_tables(evidence_dir: Path, *, seed: int = 7, treatment_names: dict[str, str] | None = None) -> dict:
    """Write pooled_outcomes.parquet/.csv, site_estimates.parquet and provenance.json; return the frames."""
    evidence_dir.mkdir(parents=True, exist_ok=True)
    rows = site_rows(seed)
    pooled, per_site = pool(rows)
    names = {tx: name for c in CONDITIONS.values() for tx, (name, _) in c["treatments"].items()} | (treatment_names or {})
    by_measure = {c["measure"]: c for c in CONDITIONS.values()}
    local = rows[rows["site"] == LOCAL_SITE].set_index(CELL_KEYS)
    cells = pooled.set_index(CELL_KEYS).index
    pooled = pooled.assign(
        condition_display=pooled["condition"].map(lambda c: CONDITIONS[c]["display"]),
        treatment_display=pooled["treatment"].map(names),
        measure_display=pooled["measure"].map(lambda m: by_measure[m]["measure_display"]),
        measure_unit=pooled["measure"].map(lambda m: by_measure[m]["unit"]),
        measure_direction="lower",
        design=DESIGN,
        manifest_version=3,
        packets_used=pooled["sites"],
        packets_rejected=0,
        local_patients=local["patients"].reindex(cells).to_numpy(),
        local_responders=local["responders"].reindex(cells).to_numpy(),
        local_mean=local["mean"].reindex(cells).to_numpy(),
        age_band_order=pooled["age_band"].map(BANDS),
    ).sort_values(["condition", "age_band_order", "sex", "rank"], ignore_index=True)
    pooled.to_parquet(evidence_dir / "pooled_outcomes.parquet", index=False)
    pooled.to_csv(evidence_dir / "pooled_outcomes.csv", index=False, na_rep="")
    per_site.to_parquet(evidence_dir / "site_estimates.parquet", index=False)
    provenance = {
        "run_date": "2024-12-05",
        "local_site": LOCAL_SITE,
        "sites": [{"site": s, "site_id": REAL_SITE_IDS[s], "as_of": OLDER if s == "Hospital E" else NEWEST,
                   "packets": int((rows["site"] == s).sum())} for s in SITES],  # fmt: skip
        "packets_used": len(rows),
        "packets_rejected": {"bad_signature": 2, "replay": 5, "out_of_range": 1},
        "mapping_version": "v1",
        "manifest_version": 3,
        "cells": len(pooled),
        "min_cell_size": 5,
    }
    (evidence_dir / "provenance.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    return {"pooled": pooled, "per_site": per_site, "provenance": provenance, "rows": rows}
