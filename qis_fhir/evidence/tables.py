"""Build and write the evidence tables a clinician's report is made from (``DIR/evidence/``).

* ``pooled_outcomes.parquet`` and ``.csv``: one row per cohort x treatment x measure x period: the
  pooled and between-hospital figures (``pooling.pool``, ranked and flagged by
  ``flags.rank_and_flag``), the local mapping's display names, the measure's unit and better
  direction, the study design in plain words, the age band's place in the mapping, the packets used
  and rejected, and this site's own figures for the same cell beside the network's.
* ``site_estimates.parquet``: each hospital's own estimate per cell, under pseudonymous labels.
* ``provenance.json``: where the figures came from: which sites (real ids only here), their data
  dates, packets used and rejected by reason, mapping and manifest versions, minimum cell size.

The report (``report.write_report``) reads these three files alone, so ``qis-fhir report DIR`` can
rebuild it without the network. Figures are never summed across periods: one patient treated in
two years is in two cells, and a sum of cells is a count of patient-periods, not of patients.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qis_fhir.evidence.collect import Collection
from qis_fhir.evidence.flags import rank_and_flag
from qis_fhir.evidence.pooling import CELL_KEYS, pool
# the file names the report reads, and its words for a unit: one definition each, in the reader
from qis_fhir.evidence.report import POOLED_NAME, PROVENANCE_NAME, SITES_NAME, unit_label
from qis_fhir.files import atomic_write, write_json

if TYPE_CHECKING:
    from qis_fhir.mapping.model import MappingSet, OutcomeMeasure

EVIDENCE_DIR = "evidence"
POOLED_CSV = "pooled_outcomes.csv"
LEVEL = 0.95


@dataclass
class EvidenceTables:
    pooled: pd.DataFrame
    per_site: pd.DataFrame
    provenance: dict


def design_text(measure: OutcomeMeasure) -> str:
    """The study design of one measure's cells, in plain words, from the mapping's own windows.

    The measure's name is beside it (``measure_display``) and every row is flagged ``observational``,
    so neither is repeated here; the unit is the one a clinician writes (mmHg, not UCUM's mm[Hg])."""
    moved = "fell" if measure.direction == "lower" else "rose"
    return (
        f"change from the last reading in the {measure.baseline_days} days up to the start of a new treatment "
        f"to the first reading {measure.followup_min_days}-{measure.followup_max_days} days after it; a patient "
        f"responded when it {moved} by at least {measure.threshold:g} {unit_label(measure.unit)}"
    )


def local_figures(events: pd.DataFrame | None, mapping: MappingSet) -> pd.DataFrame:
    """This site's own cell figures from its outcome events, unsuppressed (they never leave the site).

    The same cell definition as its packets (``packets.build.cell_aggregates``): one event per patient
    per cell, the period at the mapping's granularity. Columns CELL_KEYS + local_patients,
    local_responders, local_mean (rounded as packets are).
    """
    from qis_fhir.packets.build import cell_aggregates
    from qis_fhir.packets.model import STAT_DECIMALS

    columns = CELL_KEYS + ["local_patients", "local_responders", "local_mean"]
    if events is None or events.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    cells = cell_aggregates(events, mapping).reset_index()
    out = pd.DataFrame({
        "condition": cells["bucket"].astype(str),
        "age_band": cells["age_band"].astype(str),
        "sex": cells["sex"].astype(str),
        "treatment": cells["treatment_code"].astype(str),
        "measure": cells["measure"].astype(str),
        "period": cells["period"].astype(str),
        "mapping_version": mapping.version,
        "local_patients": cells["patients"].astype("int64"),
        "local_responders": cells["responders"].astype("int64"),
        "local_mean": cells["mean_change"].astype("float64").round(STAT_DECIMALS),
    })
    return out[columns]


def build_tables(
    collection: Collection,
    mapping: MappingSet,
    *,
    local_events: pd.DataFrame | None = None,
    run_date: str | None = None,
    level: float = LEVEL,
) -> EvidenceTables:
    """Pool the collection's site rows and dress the result for the report (see the module docstring)."""
    if collection.mapping_version != mapping.version:
        raise ValueError("the collection was made with another mapping version than the one given")
    site_rows = collection.site_rows()
    # one fit per cell gives both tables; nothing from the network gives both, empty, with every column
    pooled, per_site = pool(site_rows, level=level)
    pooled = rank_and_flag(pooled, per_site).reset_index(drop=True)

    buckets, treatments, measures = mapping.buckets, mapping.treatments, mapping.measures
    bands = {band: i for i, band in enumerate(mapping.cohorts.band_values)}
    pooled["condition_display"] = [buckets[c].description if c in buckets else c for c in pooled["condition"]]
    pooled["treatment_display"] = [treatments[t].display if t in treatments else t for t in pooled["treatment"]]
    pooled["measure_display"] = [(measures[m].description or m) if m in measures else m for m in pooled["measure"]]
    # the report's forest plot says which way is better for the mean change from these two
    pooled["measure_unit"] = [measures[m].unit if m in measures else None for m in pooled["measure"]]
    pooled["measure_direction"] = [measures[m].direction if m in measures else None for m in pooled["measure"]]
    pooled["design"] = [design_text(measures[m]) if m in measures else "" for m in pooled["measure"]]
    pooled["age_band_order"] = [bands.get(b, len(bands)) for b in pooled["age_band"]]
    pooled["manifest_version"] = collection.manifest_version
    used = site_rows.groupby(CELL_KEYS).size().rename("packets_used").reset_index()
    pooled = pooled.merge(used, on=CELL_KEYS, how="left")
    rejected = collection.rejected_per_cohort()
    # per cohort: a rejected packet's own cell fields are untrusted, the fingerprint it was asked under is not
    pooled["packets_rejected"] = [
        rejected.get((c, a, s), 0) for c, a, s in zip(pooled["condition"], pooled["age_band"], pooled["sex"])
    ]
    local = local_figures(local_events, mapping)
    pooled = pooled.merge(local, on=CELL_KEYS, how="left")
    pooled = pooled.astype({"packets_used": "int64", "packets_rejected": "int64", "age_band_order": "int64",
                            "manifest_version": "int64", "local_patients": "Int64", "local_responders": "Int64",
                            "local_mean": "float64"})
    pooled = pooled.sort_values(["condition", "age_band_order", "sex", "treatment", "measure", "period"],
                                kind="mergesort").reset_index(drop=True)

    labels = collection.labels
    provenance = {
        "run_date": run_date or datetime.now(UTC).strftime("%Y-%m-%d"),
        "local_site": labels.get(collection.local_site_id) if collection.local_site_id else None,
        "sites": collection.sites(),
        "packets_received": collection.received,
        "packets_used": len(collection.packets),
        "packets_rejected": dict(sorted(collection.rejected.items())),
        "packets_superseded": collection.superseded,
        "mapping_version": mapping.version,
        "mapping_hash": mapping.content_hash,
        "manifest_version": collection.manifest_version,
        "min_cell_size": collection.min_cell_size,
        "cells": len(pooled),
        "cohorts_queried": len(collection.grid),
        "cohorts_answered": collection.answered,
        "level": level,
    }
    return EvidenceTables(pooled, per_site.reset_index(drop=True), provenance)


def write_tables(tables: EvidenceTables, evidence_dir: Path | str) -> dict[str, Path]:
    """Write the three table files atomically (a report rebuilt mid-write sees old or new, never half)."""
    evidence_dir = Path(evidence_dir)
    paths = {
        "pooled_outcomes": evidence_dir / POOLED_NAME,
        "pooled_outcomes_csv": evidence_dir / POOLED_CSV,
        "site_estimates": evidence_dir / SITES_NAME,
        "provenance": evidence_dir / PROVENANCE_NAME,
    }
    for key, frame in (("pooled_outcomes", tables.pooled), ("site_estimates", tables.per_site)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        atomic_write(paths[key], buffer.getvalue())
    atomic_write(paths["pooled_outcomes_csv"], tables.pooled.to_csv(index=False, na_rep="").encode("utf-8"))
    write_json(paths["provenance"], tables.provenance)
    return paths
