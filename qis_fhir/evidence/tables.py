"""Build and write the evidence tables a clinician's report is made from (``DIR/evidence/``).

* ``pooled_outcomes.parquet`` and ``.csv``: one row per cohort x treatment x measure x period: the
  pooled and between-hospital figures (``pooling.pool``, ranked and flagged by
  ``flags.rank_and_flag``), the local mapping's display names, the measure's kind, unit and better
  direction (of the mean, and of the share counted in ``responders``: ``response_direction`` is
  ``lower`` for a poor-control measure), the study design in plain words (for control measures: that
  they compare prevalent users and are confounded by indication), the age band's place in the
  mapping, the packets used and rejected, and this site's own figures for the same cell beside the
  network's.
* ``site_estimates.parquet``: each hospital's own estimate per cell, under pseudonymous labels; a
  secure total (``qis_fhir.secagg``: hospitals too small to publish a cell, pooled without any one's
  figures disclosed) is one row labelled with its number of hospitals, and its pooled row carries
  ``secure_sites`` and the ``secure_total`` flag.
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
from qis_fhir.evidence.pooling import CELL_KEYS, MEASURED, SECURE_SITES, SITE_COLUMNS, pool

# the file names the report reads, and its words for a unit: one definition each, in the reader
from qis_fhir.evidence.report import POOLED_NAME, PROVENANCE_NAME, SITES_NAME, unit_label
from qis_fhir.files import atomic_write, write_json

if TYPE_CHECKING:
    from qis_fhir.mapping.model import ControlMeasure, MappingSet, OutcomeMeasure

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


#: a control measure's untreated code (``TX_NONE``), as the tables name it
UNTREATED_DISPLAY = "None of the mapped treatments"
#: said of every control cell, in the table's design column and on the report
PREVALENT_USERS = (
    "This compares prevalent users: patients on a treatment however long they have taken it, not new starts. "
    "It is confounded by indication: who receives which treatment (or none) depends on how ill they are, "
    "so differences between treatments are not effects of the treatments."
)


def control_design_text(measure: ControlMeasure) -> str:
    """The design of a control measure's cells in plain words, from the mapping's own definition."""
    unit = unit_label(measure.readings[0].unit)
    if measure.kind == "control":
        limits = " and ".join(f"{r.below:g}" for r in measure.readings)
        counted = (f"share of patients whose last reading day in the year was under {limits} {unit} "
                   f"({'every reading' if len(measure.readings) > 1 else 'the reading'}); no reading counts as not controlled")
    else:
        limits = " or ".join(f"{r.above:g}" for r in measure.readings)
        counted = (f"share of patients whose last reading in the year was over {limits} {unit} or who had no reading "
                   "in the year (lower is better)")
    return (
        f"per measurement year (the period), patients aged {measure.age_min}-{measure.age_max} at the year's end with "
        f"the condition and a visit in the year: the {counted}; modelled on {measure.source}. The mean is the last "
        f"reading over the patients who had one. A treatment counts when requested in the {measure.lookback_days} "
        f"days before that reading. {PREVALENT_USERS}"
    )


def measure_facts(mapping: MappingSet, measure: str) -> dict:
    """What the tables say about one measure id: kind, name, unit, better directions, design in words.

    ``mean_direction``: which way the mean is better (a control measure's thresholds are upper limits,
    so a lower reading is better); ``response_direction``: which way the share counted in
    ``responders`` is better (higher, except a poor-control share)."""
    if measure in mapping.measures:
        m = mapping.measures[measure]
        return {"kind": "change", "display": m.description or measure, "unit": m.unit, "mean_direction": m.direction,
                "response_direction": "higher", "design": design_text(m)}
    if measure in mapping.control_measures:
        c = mapping.control_measures[measure]
        return {"kind": c.kind, "display": c.description or measure, "unit": c.readings[0].unit, "mean_direction": "lower",
                "response_direction": c.direction, "design": control_design_text(c)}
    return {"kind": None, "display": measure, "unit": None, "mean_direction": None, "response_direction": "higher", "design": ""}


def local_figures(events: pd.DataFrame | None, mapping: MappingSet, units: pd.DataFrame | None = None) -> pd.DataFrame:
    """This site's own cell figures from its outcome events and control units, unsuppressed (they never
    leave the site).

    The same cell definition as its packets (``packets.build.site_cells``): one event per patient
    per cell, the period at the mapping's granularity (control: the measurement year). Columns
    CELL_KEYS + local_patients, local_responders, local_mean (rounded as packets are; over the
    patients with a reading in a control cell).
    """
    from qis_fhir.packets.build import site_cells
    from qis_fhir.packets.model import STAT_DECIMALS

    columns = CELL_KEYS + ["local_patients", "local_responders", "local_mean"]
    if (events is None or events.empty) and (units is None or units.empty):
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    if events is None:
        events = pd.DataFrame({c: pd.Series(dtype="object") for c in ("patient_key", "bucket", "treatment_code", "measure",
                               "start_period", "age_band", "sex", "change", "responded", "mapping_version")})
    cells = site_cells(events, units, mapping).reset_index()
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


def secure_label(sites: int) -> str:
    return f"Secure total of {sites} hospitals"


def secure_site_rows(totals: pd.DataFrame, min_cell_size: int) -> pd.DataFrame:
    """Site rows (pooling's input) from released secure totals (``qis_fhir.secagg.release.release_table``
    columns plus ``as_of``): one row per cell, labelled with its number of hospitals. A mean over
    fewer than ``min_cell_size`` patients is withheld (measured 0), as a packet's is."""
    with_mean = totals["measured"] >= min_cell_size
    rows = totals.loc[:, CELL_KEYS].assign(
        site=[secure_label(int(k)) for k in totals["sites"]],
        patients=totals["patients"].astype("int64"),
        responders=totals["responders"].astype("int64"),
        mean=totals["mean"].where(with_mean, 0.0).fillna(0.0),
        sd=totals["sd"].where(with_mean, 0.0).fillna(0.0),
        as_of=totals["as_of"].astype("int64"),
    )
    rows[MEASURED] = totals["measured"].where(with_mean, 0).astype("int64")
    rows[SECURE_SITES] = totals["sites"].astype("int64")
    return rows[CELL_KEYS + SITE_COLUMNS + [MEASURED, SECURE_SITES]]


def build_tables(
    collection: Collection,
    mapping: MappingSet,
    *,
    local_events: pd.DataFrame | None = None,
    local_units: pd.DataFrame | None = None,
    secure_totals: pd.DataFrame | None = None,
    run_date: str | None = None,
    level: float = LEVEL,
) -> EvidenceTables:
    """Pool the collection's site rows and dress the result for the report (see the module docstring).

    ``secure_totals``: the released totals of secure-aggregation rounds of this mapping version
    (``secure_site_rows``), pooled beside the packets: their hospitals never published those cells
    in the clear, so no hospital is counted twice."""
    if collection.mapping_version != mapping.version:
        raise ValueError("the collection was made with another mapping version than the one given")
    site_rows = collection.site_rows()
    secure = None
    if secure_totals is not None and len(secure_totals):
        if set(secure_totals["mapping_version"]) != {mapping.version}:
            raise ValueError("secure totals of another mapping version than the one given")
        secure = secure_site_rows(secure_totals, collection.min_cell_size)
        site_rows = pd.concat([site_rows.assign(**{SECURE_SITES: 0}), secure], ignore_index=True)
    # one fit per cell gives both tables; nothing from the network gives both, empty, with every column
    pooled, per_site = pool(site_rows, level=level)
    facts = [measure_facts(mapping, m) for m in pooled["measure"]]
    # ranking and flags read these two: which way the share is better, and the design behind it
    pooled["measure_kind"] = [f["kind"] for f in facts]
    pooled["response_direction"] = [f["response_direction"] for f in facts]
    pooled = rank_and_flag(pooled, per_site).reset_index(drop=True)

    buckets, treatments = mapping.buckets, mapping.treatments
    bands = {band: i for i, band in enumerate(mapping.cohorts.band_values)}
    pooled["condition_display"] = [buckets[c].description if c in buckets else c for c in pooled["condition"]]
    untreated = {c.untreated_code for c in mapping.control_measures.values()}
    pooled["treatment_display"] = [treatments[t].display if t in treatments else UNTREATED_DISPLAY if t in untreated else t
                                   for t in pooled["treatment"]]
    pooled["measure_display"] = [f["display"] for f in facts]
    # the report's forest plot says which way is better for the mean from these two
    pooled["measure_unit"] = [f["unit"] for f in facts]
    pooled["measure_direction"] = [f["mean_direction"] for f in facts]
    pooled["design"] = [f["design"] for f in facts]
    pooled["age_band_order"] = [bands.get(b, len(bands)) for b in pooled["age_band"]]
    pooled["manifest_version"] = collection.manifest_version
    packets = site_rows if secure is None else site_rows[site_rows[SECURE_SITES] == 0]
    used = packets.groupby(CELL_KEYS).size().rename("packets_used").reset_index()
    pooled = pooled.merge(used, on=CELL_KEYS, how="left")
    rejected = collection.rejected_per_cohort()
    # per cohort: a rejected packet's own cell fields are untrusted, the fingerprint it was asked under is not
    pooled["packets_rejected"] = [
        rejected.get((c, a, s), 0) for c, a, s in zip(pooled["condition"], pooled["age_band"], pooled["sex"])
    ]
    local = local_figures(local_events, mapping, local_units)
    pooled = pooled.merge(local, on=CELL_KEYS, how="left")
    pooled["packets_used"] = pooled["packets_used"].fillna(0)
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
        "secure_cells": 0 if secure is None else len(secure),
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
