"""Evidence tables for the report's tests: a small, realistic network result written as the contract's files.

Two conditions, three age bands, both sexes, three or four treatments each, one to five hospitals per
cell (so between-hospital figures are missing where fewer than 2 or 3 hospitals reported), one cohort
no hospital reported, one with fewer than 30 patients, a cell where everyone responded and one where
nobody did, one hospital whose data are two months older than the rest, and one condition and age
band reported for an earlier period too.

The tables are pooled, ranked and flagged by the stage's own ``pooling.pool`` and ``flags.rank_and_flag``;
the report is tested against whatever the tables say, read back from the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from qis_fhir.evidence import pooling
from qis_fhir.evidence.flags import rank_and_flag
from qis_fhir.evidence.pooling import CELL_KEYS

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


def pool(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ranked and flagged pooled table, per-site table), as the stage's tables module makes them."""
    pooled, per_site = pooling.pool(rows, level=0.95)
    return rank_and_flag(pooled, per_site), per_site


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


def embedded_data(html: str) -> dict:
    """The figures a report page carries (the JSON its script places), parsed."""
    text = re.search(r'<script type="application/json" id="evidence-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)
