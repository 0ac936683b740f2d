"""Site rows as the network delivers them, simulated from patient-level data the test keeps.

Each site's packet is built the way ``qis_fhir/packets/build.py`` builds it: n, responders, the mean
and the sample SD (ddof 1) of the change, rounded to STAT_DECIMALS, SD 0.0 for a single patient.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qis_fhir.evidence.pooling import CELL_KEYS, SITE_COLUMNS
from qis_fhir.packets.model import STAT_DECIMALS

CELL = {"condition": "hypertension", "age_band": "40-64", "sex": "female", "treatment": "TX_ACE",
        "measure": "sbp", "period": "2024", "mapping_version": "v1"}


def site_row(changes, responded, site: str, as_of: int = 20241201, **cell) -> dict:
    changes = np.asarray(changes, dtype=float)
    n = len(changes)
    return {**CELL, **cell, "site": site, "patients": n, "responders": int(np.sum(responded)),
            "mean": round(float(changes.mean()), STAT_DECIMALS) + 0.0,
            "sd": round(float(changes.std(ddof=1)), STAT_DECIMALS) + 0.0 if n > 1 else 0.0, "as_of": as_of}


def counts_row(n: int, r: int, site: str, mean: float = -5.0, sd: float = 10.0, as_of: int = 20241201, **cell) -> dict:
    return {**CELL, **cell, "site": site, "patients": n, "responders": r, "mean": mean,
            "sd": sd if n > 1 else 0.0, "as_of": as_of}


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CELL_KEYS + SITE_COLUMNS)


def binomial_sites(rng: np.random.Generator, k: int, p: float, tau: float, n_low: int = 20, n_high: int = 200):
    """k sites' (r, n) with logit(p_site) ~ N(logit p, tau^2)."""
    n = rng.integers(n_low, n_high, k)
    logit = np.log(p / (1 - p)) + tau * rng.standard_normal(k)
    return rng.binomial(n, 1 / (1 + np.exp(-logit))), n
