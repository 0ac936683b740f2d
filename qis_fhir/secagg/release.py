"""The release rules of secure aggregation: what is summed, what is shown, and that it is shown once.

Every member can unmask a round's totals, so the rules decide what is *summed*, not only what is shown:

1. **Clear cells stay out.** A site never puts in a masked vector a cell it publishes in the clear:
   one with at least ``min_cell_size`` patients now (the packet stage's ``is_publishable``) or one it
   has released in a packet before (its release state). A pooled cell is then the clear packets plus
   one secure total over *other* sites, disjoint: subtracting the clear figures from the pooled total
   gives the secure total, itself a sum over at least ``m`` sites, never one site's small count.
2. **Presence first.** The presence round sums, per cell of the round, 1 from each site with patients
   it does not publish. Only cells where at least ``m`` (the manifest's ``min_sites``) sites have
   patients go into the value round (``eligible``): a cell with patients at fewer sites is never summed.
3. **Same sites in both rounds.** The value round reveals nothing unless its contributors are exactly
   the presence round's (``SiteRound.required_contributors``), so the presence counts hold for it; its
   own ``sites`` component counts them again and ``shown`` checks it.
4. **Shown** when the secure total reaches ``min_cell_size`` patients and ``m`` sites (``shown``).
5. **Once.** A round is one (mapping version, measure, period), its ``opens`` day fixed by the period
   (``values.round_opens``), so its ``RoundRef`` is the same at every site and every run; each site's
   ``RoundJournal`` takes one contribution per round and the ``ReleaseLedger`` one release per
   (measure, period) under any mapping version. A second round over the same cells, with or without one
   site, would need the honest sites to contribute again, which they refuse: no two releases over the
   same cells exist to be differenced.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd

from qis_fhir.errors import InputNotFoundError, RoundRepeatedError
from qis_fhir.files import atomic_write
from qis_fhir.privacy.disclosure import is_publishable
from qis_fhir.privacy.fingerprint import cohort_table
from qis_fhir.secagg.round import SCHEDULE, RoundRef, Schedule, value_opens
from qis_fhir.secagg.values import (
    VALUE_FIELDS,
    Cell,
    SiteInput,
    cell_figures,
    mean_sd,
    patient_rows,
    round_cells,
    round_opens,
)

if TYPE_CHECKING:
    from qis_fhir.mapping.model import MappingSet
    from qis_fhir.packets.model import Packet

#: a site directory's folder of released secure totals (``ReleaseLedger``), read by the evidence stage
LEDGER_DIR = "secagg_released"
#: columns of a released secure total, beside the evidence stage's cell keys
RELEASE_COLUMNS = ["sites", "patients", "responders", "measured", "mean", "sd", "as_of"]


def round_refs(network_id: str, mapping: MappingSet, measure: str, period: str, schedule: Schedule = SCHEDULE) -> tuple[RoundRef, RoundRef]:
    """The presence and value rounds of (mapping version, measure, period): the same at every site. The
    presence round opens once the period can no longer change; the value round on the presence round's
    unmasking day, when the eligible cells are known (a whole round takes ``schedule``'s 7 days)."""
    presence = RoundRef(network_id, mapping.version, measure, period, "presence", round_opens(mapping, measure, period))
    return presence, replace(presence, stage="value", opens=value_opens(presence, schedule))


def clear_cells(cells: list[Cell], figures: np.ndarray, min_cell_size: int, released: set[Cell] | frozenset = frozenset()) -> np.ndarray:
    """Per cell: does this site publish it in the clear (rule 1)?"""
    now = np.array([is_publishable(int(n), min_cell_size) for n in figures[:, 0]], dtype=bool)
    before = np.array([c in released for c in cells], dtype=bool)
    return now | before if len(cells) else np.zeros(0, dtype=bool)


def released_cells(packets: list[Packet], network_secret: bytes, mapping: MappingSet, measure: str, period: str) -> set[Cell]:
    """The cells of a round this site has released packets for (``packets.release.load_release_state``)."""
    grid = cohort_table(network_secret, mapping)
    return {(*grid[p.fingerprint], p.treatment) for p in packets
            if p.measure == measure and p.period == period and p.mapping_version == mapping.version and p.fingerprint in grid}


def eligible(presence_totals: np.ndarray, min_sites: int) -> np.ndarray:
    """Indices of the cells with patients at ``min_sites`` sites or more (rule 2)."""
    return np.flatnonzero(np.asarray(presence_totals, dtype=np.uint64).view(np.int64) >= min_sites)


def shown(decoded: np.ndarray, min_cell_size: int, min_sites: int) -> np.ndarray:
    """Per eligible cell: may its secure total be shown (rule 4)?"""
    sites, patients = decoded[:, VALUE_FIELDS.index("sites")], decoded[:, VALUE_FIELDS.index("patients")]
    return (patients >= min_cell_size) & (sites >= min_sites)


def release_table(ref: RoundRef, cells: list[Cell], eligible_idx: np.ndarray, decoded: np.ndarray, min_cell_size: int,
                  min_sites: int) -> pd.DataFrame:
    """The shown secure totals of one round: the evidence stage's cell keys and ``RELEASE_COLUMNS``."""
    keep = shown(decoded, min_cell_size, min_sites)
    as_of = int(ref.opens.replace("-", ""))  # the data date of a secure total: the day its period closed
    rows = []
    for i, figures in zip(eligible_idx[keep], decoded[keep]):
        sites, patients, responders, measured, total, total_sq = (int(x) for x in figures)
        mean, sd = mean_sd(measured, total, total_sq)
        b, band, sex, treatment = cells[i]
        rows.append((b, band, sex, treatment, ref.measure, ref.period, ref.mapping_version, sites, patients, responders,
                     measured, mean, sd, as_of))
    columns = ["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version", *RELEASE_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"sites": "int64", "patients": "int64", "responders": "int64", "measured": "int64",
                         "mean": "float64", "sd": "float64", "as_of": "int64"})


#: beside a release: the cells of it this site put patients in (``CONTRIBUTED_KEYS``: a packet's cell and the mapping version)
CONTRIBUTED = ".contributed.parquet"
CONTRIBUTED_KEYS = ["condition", "age_band", "sex", "treatment", "measure", "period", "mapping_version"]


def _write_parquet(path: Path, table: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())


class ReleaseLedger:
    """A member's record of the secure totals released (``SITE_DIR/secagg_released/``): per (network,
    measure, period), under any mapping version, a record created with ``O_EXCL`` and the released
    table beside it. Recording the same totals again is a no-op (a report rebuilt); different totals for
    the same cells are refused (rule 5). The evidence stage reads the tables (``tables``)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def record(self, ref: RoundRef, table: pd.DataFrame, contributed: np.ndarray | None = None) -> None:
        """``contributed``: per row of ``table``, whether this site's patients are in it (``None``: not
        known, as when the round's input was gone; then every row counts as this site's). Kept the
        first time (``CONTRIBUTED``): the packet stage never publishes those cells in the clear."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(f"{ref.network_id}\n{ref.measure}\n{ref.period}".encode()).hexdigest()[:32]
        path = self.directory / f"{key}.json"
        digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
        body = orjson.dumps({"mapping_version": ref.mapping_version, "measure": ref.measure, "period": ref.period,
                             "totals_sha256": digest, "cells": len(table)}, option=orjson.OPT_SORT_KEYS)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if path.read_bytes() != body:
                raise RoundRepeatedError(
                    f"secure totals of {ref.measure} {ref.period} were released before with other figures ({path}); "
                    "a second release over the same cells could be differenced to one site's figures"
                ) from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        # the claim above comes first, so two releases can never both write; the table is (re)written after
        _write_parquet(path.with_suffix(".parquet"), table)
        mine = path.with_suffix(CONTRIBUTED)
        if not mine.exists():
            rows = table if contributed is None else table[np.asarray(contributed, dtype=bool)]
            _write_parquet(mine, rows[CONTRIBUTED_KEYS])

    def contributed_cells(self, mapping_version: str) -> set[tuple[str, ...]]:
        """The cells (``CONTRIBUTED_KEYS``) of ``mapping_version`` this site put patients in a released secure total of."""
        cells: set[tuple[str, ...]] = set()
        for mine in sorted(self.directory.glob(f"*{CONTRIBUTED}")) if self.directory.is_dir() else []:
            rows = pd.read_parquet(mine)
            rows = rows[rows["mapping_version"] == mapping_version]
            cells |= set(rows[CONTRIBUTED_KEYS[:-1]].itertuples(index=False, name=None))
        return cells

    def tables(self, mapping_version: str) -> pd.DataFrame | None:
        """Every released table of ``mapping_version``, concatenated; None when there is none."""
        frames = []
        for record in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            meta = orjson.loads(record.read_bytes())
            if meta["mapping_version"] != mapping_version:
                continue
            table_path = record.with_suffix(".parquet")
            if not table_path.exists():
                raise InputNotFoundError(f"{table_path} is missing: record the release of {meta['measure']} {meta['period']} again")
            frames.append(pd.read_parquet(table_path))
        return pd.concat(frames, ignore_index=True) if frames else None


def site_input(events: pd.DataFrame | None, units: pd.DataFrame | None, mapping: MappingSet, measure: str, period: str,
               min_cell_size: int, released: set[Cell] | frozenset = frozenset()) -> SiteInput:
    """A site's input to the rounds of (measure, period): its figures per cell, cells it publishes in
    the clear marked (rule 1; ``released``: ``released_cells`` of its release state)."""
    cells = round_cells(mapping, measure)
    figures = cell_figures(patient_rows(events, units, mapping, measure, period), cells)
    return SiteInput(cells, figures, clear_cells(cells, figures, min_cell_size, released))
