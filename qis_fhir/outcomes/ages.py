"""Age in whole years at a date, and its band: one rule for events (at the start) and control units
(on the last day of the measurement year)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qis_fhir.mapping import UNKNOWN, MappingSet


def age_years(start: pd.Series, birth: pd.Series) -> pd.Series:
    """Whole years completed at ``start`` (birthday reached or not), NaN when birth is unknown."""
    s, b = start.dt.tz_convert("UTC"), birth.dt.tz_convert("UTC")
    years = s.dt.year - b.dt.year
    before_birthday = (s.dt.month * 100 + s.dt.day) < (b.dt.month * 100 + b.dt.day)
    return (years - before_birthday.astype("float64")).astype("float64")


def age_bands(age: pd.Series, mapping: MappingSet) -> np.ndarray:
    conds, labels = [], []
    for band in mapping.cohorts.age_bands:
        c = age >= band.min_years
        if band.max_years is not None:
            c &= age <= band.max_years
        conds.append(c.fillna(False).to_numpy(bool))
        labels.append(band.label)
    return np.select(conds, labels, default=UNKNOWN) if conds else np.full(len(age), UNKNOWN)
