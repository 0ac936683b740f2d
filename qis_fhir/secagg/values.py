"""What a site sums in a round: fixed-point figures per cell, as ring elements.

A round covers one (mapping version, measure, period). Its cells are every cohort x treatment the
mapping allows for the measure (``round_cells``), so every site builds vectors of the same length in
the same order without saying which cells it has. Per cell a site holds (``FIGURES``): patients,
responders, patients with a value (``measured``), and the sum and sum of squares of the values, each
value quantised first: ``q = round_half_even(value * SCALE)``. The cells are cut by the packet
stage's own grouping (``packets.build.cell_rows`` / ``control_cell_rows``: one event per patient per
cell, the earliest), so a cell here is the cell a packet would carry.

Ring and bound. Vectors live in Z_{2^64}, read back as two's complement int64. With ``SCALE`` = 100
(0.01 of the measure's unit) and |value| <= ``VALUE_BOUND`` = 10^4 units (refused above: every
measure's plausible range, blood pressure to glucose in mg/dL, and the change between two such
readings, lies well inside), a patient adds |q| <= 10^6 and q^2 <= 10^12, so a cell's sum of squares
stays below 2^63 - 1 ~ 9.2 x 10^18 for up to ``MAX_CELL_PATIENTS`` = 9.2 x 10^6 patients network-wide;
its sum of values, |sum q| <= 9.2 x 10^12, and its counts are far inside. No cohort x treatment x period of a
hospital network comes near 9 million patients; ``decode_totals`` refuses totals that break the bound
or the figures' own relations (responders <= patients, ...), which wrap-around would.

Because every site sums the same integers a central run would, the network totals equal a central
computation over the same patients exactly (``cell_figures`` of all sites' patient rows together), not
up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from qis_fhir.errors import SecAggAbortedError
from qis_fhir.packets.build import CELL_COLUMNS, cell_rows, control_cell_rows

if TYPE_CHECKING:
    from qis_fhir.mapping.model import MappingSet

SCALE = 100
VALUE_BOUND = 10**4
MAX_CELL_PATIENTS = (2**63 - 1) // (VALUE_BOUND * SCALE) ** 2
#: a site's figures per cell, in this order
FIGURES = ("patients", "responders", "measured", "sum", "sum_sq")
#: the value round's components per cell: ``sites`` (1 when the site has patients in it) then FIGURES
VALUE_FIELDS = ("sites", *FIGURES)
Cell = tuple[str, str, str, str]  # (condition bucket, age band, sex, treatment)


def round_cells(mapping: MappingSet, measure: str) -> list[Cell]:
    """Every cell of a round of ``measure``: the buckets the measure judges x age bands x sexes x the
    treatments of each bucket (and a control measure's untreated code), sorted."""
    if measure in mapping.measures:
        buckets = [b for b, spec in mapping.buckets.items() if measure in spec.measures]
        extra: list[str] = []
    elif measure in mapping.control_measures:
        buckets = list(mapping.control_measures[measure].buckets)
        extra = [mapping.control_measures[measure].untreated_code]
    else:
        raise ValueError(f"measure {measure!r} is not in mapping {mapping.version}")
    cells = set()
    for b in buckets:
        treatments = [t for t, spec in mapping.treatments.items() if b in spec.buckets] + extra
        for band in mapping.cohorts.band_values:
            for sex in mapping.cohorts.sex_values:
                cells.update((b, band, sex, t) for t in treatments)
    return sorted(cells)


def round_opens(mapping: MappingSet, measure: str, period: str) -> str:
    """The first day (YYYY-MM-DD) a period's figures can no longer change: the day after the period,
    and for a change measure after the last follow-up window of a treatment started on its last day."""
    year = int(period[:4])
    if "-Q" in period:
        last_month = int(period[-1]) * 3
    elif len(period) == 7:
        last_month = int(period[5:7])
    else:
        last_month = 12
    after = date(year + (last_month == 12), last_month % 12 + 1, 1)  # the day after the period
    if measure in mapping.measures:
        after += timedelta(days=mapping.measures[measure].followup_max_days)
    return after.isoformat()


def quantise(values: pd.Series | np.ndarray) -> np.ndarray:
    """Values in fixed point (int64 of round-half-even ``value * SCALE``); refuses |value| > VALUE_BOUND."""
    v = np.asarray(values, dtype="float64")
    if not np.all(np.isfinite(v)) or np.any(np.abs(v) > VALUE_BOUND):
        bad = int((~np.isfinite(v) | (np.abs(v) > VALUE_BOUND)).sum())
        raise ValueError(f"{bad} values are outside +-{VALUE_BOUND} (the fixed-point bound of secure aggregation)")
    return np.rint(v * SCALE).astype(np.int64)


def patient_rows(events: pd.DataFrame | None, units: pd.DataFrame | None, mapping: MappingSet, measure: str,
                 period: str) -> pd.DataFrame:
    """One row per patient of the round's cells: ``CELL_COLUMNS``, ``responded`` (bool) and ``value``
    (NaN: no reading, a control unit only), cut as the packets are."""
    columns = [*CELL_COLUMNS, "responded", "value"]
    if measure in mapping.control_measures:
        if units is None or units.empty:
            return pd.DataFrame({c: [] for c in columns})
        rows = control_cell_rows(units, mapping).rename(columns={"numerator": "responded", "index_value": "value"})
    else:
        if events is None or events.empty:
            return pd.DataFrame({c: [] for c in columns})
        rows = cell_rows(events, mapping).rename(columns={"change": "value"})
    rows = rows[(rows["measure"] == measure) & (rows["period"] == period)]
    return rows.assign(responded=rows["responded"].astype(bool)).loc[:, columns].reset_index(drop=True)


def cell_figures(rows: pd.DataFrame, cells: list[Cell]) -> np.ndarray:
    """int64 (len(cells), len(FIGURES)): each cell's figures from ``patient_rows`` (exact integers)."""
    out = np.zeros((len(cells), len(FIGURES)), dtype=np.int64)
    if rows.empty:
        return out
    index = {c: i for i, c in enumerate(cells)}
    keys = list(zip(rows["bucket"], rows["age_band"], rows["sex"], rows["treatment_code"]))
    where = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
    if (where < 0).any():
        raise ValueError(f"{int((where < 0).sum())} patients fall in cells the mapping does not define for this measure")
    measured = rows["value"].notna().to_numpy()
    q = np.zeros(len(rows), dtype=np.int64)
    q[measured] = quantise(rows["value"].to_numpy()[measured])
    per = pd.DataFrame({"cell": where, "patients": 1, "responders": rows["responded"].to_numpy().astype(np.int64),
                        "measured": measured.astype(np.int64), "sum": q, "sum_sq": q * q})
    summed = per.groupby("cell").sum()  # int64 sums: exact
    out[summed.index.to_numpy()] = summed.loc[:, list(FIGURES)].to_numpy(dtype=np.int64)
    return out


@dataclass(frozen=True)
class SiteInput:
    """One site's figures for one round's cells, and which cells it publishes in the clear (those are
    never in its masked vectors: ``release.clear_cells``)."""

    cells: list[Cell]
    figures: np.ndarray  # int64 (cells, FIGURES)
    clear: np.ndarray  # bool (cells,)

    def presence_vector(self) -> np.ndarray:
        """The presence round's input: 1 per cell where this site has patients it does not publish."""
        return ((self.figures[:, 0] > 0) & ~self.clear).astype(np.uint64)

    def value_vector(self, eligible: np.ndarray) -> np.ndarray:
        """The value round's input over the ``eligible`` cells (indices): VALUE_FIELDS per cell, zero
        where the site publishes the cell in the clear; negative sums in two's complement."""
        fig = np.where(self.clear[eligible, None], 0, self.figures[eligible])
        sites = (fig[:, :1] > 0).astype(np.int64)
        return np.hstack([sites, fig]).reshape(-1).astype(np.uint64)


def decode_totals(totals: np.ndarray, n_cells: int) -> np.ndarray:
    """int64 (n_cells, VALUE_FIELDS) from a value round's totals, refusing totals no honest sites can
    produce (negative counts, responders or measured above patients, a sum of squares below
    sum^2 / measured): the mark of a wrap-around or of a site that put garbage in."""
    t = np.asarray(totals, dtype=np.uint64).view(np.int64).reshape(n_cells, len(VALUE_FIELDS))
    sites, patients, responders, measured, s, ss = (t[:, i] for i in range(len(VALUE_FIELDS)))
    bad = (sites < 0) | (patients < 0) | (responders < 0) | (responders > patients) | (measured < 0) | (measured > patients)
    bad |= (ss < 0) | (patients > MAX_CELL_PATIENTS) | ((sites > 0) != (patients > 0))
    bad |= np.array([int(m) * int(q2) < int(q) ** 2 for m, q, q2 in zip(measured, s, ss)], dtype=bool)
    if bad.any():
        raise SecAggAbortedError(f"{int(bad.sum())} cells have totals that honest sites cannot produce: not released")
    return t


def mean_sd(measured: int, total: int, total_sq: int) -> tuple[float, float]:
    """Mean and SD (ddof 1) of the values from their fixed-point sums, exact until the last float
    rounding (NaN: no value; SD NaN under two)."""
    if measured < 1:
        return float("nan"), float("nan")
    mean = float(Fraction(total, measured * SCALE))
    if measured < 2:
        return mean, float("nan")
    var = Fraction(measured * total_sq - total * total, measured * (measured - 1) * SCALE * SCALE)
    return mean, float(var) ** 0.5

