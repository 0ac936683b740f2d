"""Control measures: per complete measurement year, one unit per patient x year x treatment.

Modelled on the eCQMs that measure exactly what routine exports hold (docs/outcomes.md): CMS165
(Controlling High Blood Pressure) for ``kind: control``, CMS122 (HbA1c poor control) for
``kind: poor_control``. Unlike the change design, a unit needs no treatment start inside the export:
a patient treated for years before the history begins still counts in every complete year with a
visit, which is what most patients of a real export are (prevalent users).

Flow, per measure, all in whole columns: visit years (Encounters, complete calendar years only) x
the bucket's conditions active by the onset month -> candidates -> age on the year's last day ->
eligible -> exclusions by reason (first listed that applies) -> denominator -> index day and values
-> treatments with a request in the look-back before the index day (or the untreated code) -> units.
The summary's counts add up at every step and are checked before anything is returned.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qis_fhir.mapping import UNKNOWN, ControlMeasure, MappingSet
from qis_fhir.mapping.model import match_code, match_codes
from qis_fhir.outcomes.ages import age_bands, age_years
from qis_fhir.outcomes.events import row_ids
from qis_fhir.outcomes.linkage import mapped_conditions
from qis_fhir.outcomes.windows import USABLE, day_number, one_of, select_readings

CONTROL_UNITS = "control_units.parquet"

#: Columns of ``control_units.parquet``, in order (docs/architecture.md).
UNIT_COLUMNS = [
    "unit_id",
    "patient_key",
    "bucket",
    "measure",
    "treatment_code",
    "period",  # the measurement year, "YYYY"
    "age_band",  # from the age on the year's last day
    "sex",
    "index_day",  # the latest day of the year with every reading; null without one
    "index_value",  # the lowest value of the first reading on the index day; null without one
    "values",  # the lowest value of each reading on the index day, in the measure's order; empty without one
    "numerator",  # control: controlled; poor_control: poorly controlled (a missing reading counts)
    "mapping_version",
    "mapping_hash",
]

#: Visits that did not take place do not put a patient in a denominator.
IGNORED_VISIT_STATUS = frozenset({"planned", "cancelled", "entered-in-error"})

#: A request still in force when the export was made: it was not stopped or completed before any index
#: day after it, so it counts however long ago it was authored. Any other request (``stopped``,
#: ``completed``: the extract holds no date for either) counts only inside the look-back.
ONGOING_REQUEST_STATUS = frozenset({"active", "on-hold"})

#: Why a candidate patient-year (condition active, a visit) is not eligible, checked in this order.
NOT_ELIGIBLE = ["patient_unknown", "age_unknown", "outside_age_range"]


def _year_of(days: np.ndarray) -> np.ndarray:
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype("int64") + 1970


def _first_day(years: np.ndarray, month: int = 1) -> np.ndarray:
    """Day number of the first day of ``month`` of each year (month 13 = January of the next year)."""
    months = (np.asarray(years, dtype="int64") - 1970) * 12 + (month - 1)
    return months.astype("datetime64[M]").astype("datetime64[D]").astype("int64")


def _days(ts: pd.Series) -> np.ndarray:
    """Day numbers of a timestamp column, NaN where it is null."""
    out = np.full(len(ts), np.nan)
    known = ts.notna().to_numpy()
    if known.any():
        out[known] = day_number(ts[known]).to_numpy()
    return out


def empty_units() -> pd.DataFrame:
    return _typed(pd.DataFrame({c: [] for c in UNIT_COLUMNS}))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[UNIT_COLUMNS].copy()
    for c in ["unit_id", "patient_key", "bucket", "measure", "treatment_code", "period", "age_band", "sex",
              "mapping_version", "mapping_hash"]:
        df[c] = df[c].astype("str")
    df["index_day"] = pd.to_datetime(df["index_day"], utc=True).astype("datetime64[us, UTC]")
    df["index_value"] = df["index_value"].astype("float64")
    df["values"] = [list(map(float, v)) for v in df["values"]]
    df["numerator"] = df["numerator"].astype(bool)
    return df.reset_index(drop=True)


def _series_id(measure: str, i: int) -> str:
    return f"{measure}#{i}"


def _readings(observations: pd.DataFrame, mapping: MappingSet) -> tuple[pd.DataFrame, dict[str, int]]:
    """Usable readings of every control measure's codes: measure, reading index, patient, day, value."""
    rows, panels = [], []
    for m in mapping.control_measures.values():
        for i, r in enumerate(m.readings):
            sid = _series_id(m.id, i)
            rows.append((sid, len(rows), r.loinc, r.unit, r.plausible_min, r.plausible_max))
            panels += [(sid, p) for p in r.panels]
    mt = pd.DataFrame(rows, columns=["measure", "measure_idx", "code", "measure_unit", "plausible_min", "plausible_max"])
    mt = mt.astype({"measure": "object", "code": "object", "measure_unit": "object"})
    obs, counts = select_readings(observations, mt, panels)
    obs = obs[obs["reading"].to_numpy() == USABLE]
    split = obs["measure"].astype(str).str.rsplit("#", n=1, expand=True)
    if len(obs):
        obs = obs.assign(control=split[0].to_numpy(), i=split[1].astype("int64").to_numpy())
    else:
        obs = obs.assign(control=pd.Series(dtype="object"), i=pd.Series(dtype="int64"))
    return obs[["patient_key", "control", "i", "obs_day", "value"]], counts


def _index_values(readings: pd.DataFrame, m: ControlMeasure) -> pd.DataFrame:
    """Per (patient, year): the latest day with a value of every reading, and the lowest of each that day."""
    r = readings[readings["control"].to_numpy() == m.id]
    n = len(m.readings)
    low = r.groupby(["patient_key", "obs_day", "i"], sort=False)["value"].min().unstack("i")
    low = low.reindex(columns=range(n)).dropna()  # a day without every reading is no index day
    low = low.reset_index().sort_values("obs_day", kind="stable")
    low["year"] = _year_of(low["obs_day"].to_numpy(dtype="int64"))
    last = low.drop_duplicates(["patient_key", "year"], keep="last")
    out = pd.DataFrame({"patient_key": last["patient_key"].to_numpy(), "year": last["year"].to_numpy(),
                        "index_day_n": last["obs_day"].to_numpy(dtype="float64")})
    out["values"] = list(last[list(range(n))].to_numpy(dtype="float64")) if len(last) else []
    return out


def _numerator(values: pd.Series, m: ControlMeasure) -> np.ndarray:
    """control: every value strictly under its threshold; poor_control: one strictly over, or no value."""
    out = np.zeros(len(values), dtype=bool)
    for k, v in enumerate(values):
        if not isinstance(v, np.ndarray):  # no index day
            out[k] = m.kind == "poor_control"
        elif m.kind == "control":
            out[k] = all(x < r.below for x, r in zip(v, m.readings))
        else:
            out[k] = any(x > r.above for x, r in zip(v, m.readings))
    return out


def _exclusion_table(m: ControlMeasure) -> pd.DataFrame:
    rows = [(system, match_code(system, code), reason, order)
            for order, (reason, lists) in enumerate(m.exclusions.items())
            for system, codes in lists.items() for code in codes]
    return pd.DataFrame(rows, columns=["code_system", "_match", "reason", "order"]).astype(
        {"code_system": "object", "_match": "object", "reason": "object"})


def _exclusions(cands: pd.DataFrame, conditions: pd.DataFrame, m: ControlMeasure) -> np.ndarray:
    """The first exclusion reason (YAML order) with a condition active at any time in the year, or ""."""
    reasons = np.full(len(cands), "", dtype=object)
    table = _exclusion_table(m)
    if table.empty or cands.empty:
        return reasons
    cond = conditions[["patient_key", "code_system", "code", "onset", "abatement"]]
    cond = cond.assign(_match=match_codes(cond["code_system"], cond["code"]))
    hits = cond.merge(table, on=["code_system", "_match"], how="inner")
    hits = hits.assign(onset_n=_days(hits["onset"]), abate_n=_days(hits["abatement"]))
    c = cands[["patient_key", "year"]].reset_index().rename(columns={"index": "_row"})
    c = c.merge(hits[["patient_key", "reason", "order", "onset_n", "abate_n"]], on="patient_key", how="inner")
    y0, y1 = _first_day(c["year"].to_numpy()), _first_day(c["year"].to_numpy() + 1)
    active = (c["onset_n"].to_numpy() < y1) & (np.isnan(c["abate_n"].to_numpy()) | (c["abate_n"].to_numpy() >= y0))
    first = c[active].sort_values(["_row", "order"], kind="stable").drop_duplicates("_row")
    reasons[first["_row"].to_numpy()] = first["reason"].to_numpy()
    return reasons


def _measure_units(m: ControlMeasure, visit_years: pd.DataFrame, cond: pd.DataFrame, conditions: pd.DataFrame,
                   patients: pd.DataFrame, readings: pd.DataFrame, links: pd.DataFrame,
                   mapping: MappingSet) -> tuple[pd.DataFrame, dict]:
    c = cond[one_of(cond["bucket"], m.buckets)]
    cand = visit_years.merge(c[["patient_key", "bucket", "onset", "abatement"]], on="patient_key", how="inner")
    years = cand["year"].to_numpy(dtype="int64")
    onset_n, abate_n = _days(cand["onset"]), _days(cand["abatement"])
    active = (onset_n < _first_day(years, m.onset_by_month + 1)) & (np.isnan(abate_n) | (abate_n >= _first_day(years)))
    cand = cand[active].drop_duplicates(["patient_key", "bucket", "year"])[["patient_key", "bucket", "year"]]
    cand = cand.merge(patients.assign(_known=True), on="patient_key", how="left").reset_index(drop=True)

    year_end = pd.to_datetime(cand["year"].astype(str) + "-12-31", utc=True)
    age = age_years(year_end, cand["birth_date"]) if len(cand) else pd.Series(dtype="float64")
    status = np.select(
        [cand["_known"].isna().to_numpy(), age.isna().to_numpy(),
         ((age < m.age_min) | (age > m.age_max)).to_numpy()],
        NOT_ELIGIBLE, default="",
    )
    eligible = cand[status == ""].assign(age=age[status == ""]).reset_index(drop=True)
    exclusion = _exclusions(eligible, conditions, m)
    den = eligible[exclusion == ""].reset_index(drop=True)

    den = den.merge(_index_values(readings, m), on=["patient_key", "year"], how="left")
    den["numerator"] = _numerator(den["values"], m)
    last_day = _first_day(den["year"].to_numpy(dtype="int64") + 1) - 1
    den["ref_day"] = np.where(den["index_day_n"].isna(), last_day, den["index_day_n"])

    requests = links[one_of(links["bucket"], m.buckets)]
    requests = requests.assign(day=day_number(requests["authored_on"]).to_numpy(),
                               ongoing=one_of(requests["status"], ONGOING_REQUEST_STATUS))
    requests = requests[["patient_key", "bucket", "treatment_code", "day", "ongoing"]]
    tx = den[["patient_key", "bucket", "year", "ref_day"]].merge(requests, on=["patient_key", "bucket"], how="inner")
    on = (tx["day"] <= tx["ref_day"]) & ((tx["day"] >= tx["ref_day"] - m.lookback_days) | tx["ongoing"])
    tx = tx[on].drop_duplicates(["patient_key", "bucket", "year", "treatment_code"])
    units = den.merge(tx[["patient_key", "bucket", "year", "treatment_code"]], on=["patient_key", "bucket", "year"],
                      how="left")
    units["treatment_code"] = units["treatment_code"].fillna(m.untreated_code)

    units["measure"] = m.id
    units["period"] = units["year"].astype(str)
    units["age_band"] = age_bands(units["age"], mapping)
    units["sex"] = units["sex"].where(units["sex"].isin(mapping.cohorts.sexes), UNKNOWN).fillna(UNKNOWN)
    has = units["index_day_n"].notna()
    units["index_day"] = pd.to_datetime(units["index_day_n"].where(has).to_numpy() * 86400, unit="s", utc=True)
    units["index_value"] = [v[0] if isinstance(v, np.ndarray) else np.nan for v in units["values"]]
    units["values"] = [v if isinstance(v, np.ndarray) else [] for v in units["values"]]
    units["mapping_version"] = mapping.version
    units["mapping_hash"] = mapping.content_hash
    units["unit_id"] = row_ids(*(units[c] for c in ("patient_key", "bucket", "measure", "treatment_code", "period")))

    n_tx = tx.groupby(["patient_key", "bucket", "year"]).size()
    with_reading = den["index_day_n"].notna()
    by_tx = {}
    for code in [*sorted(t.id for t in mapping.treatments.values() if set(t.buckets) & set(m.buckets)), m.untreated_code]:
        part = units[units["treatment_code"] == code]
        by_tx[code] = {"units": int(len(part)), "numerator": int(part["numerator"].sum()),
                       "with_reading": int(part["index_day_n"].notna().sum())}
    by_year = {}
    for year in sorted(den["year"].unique()):
        part = den[den["year"] == year]
        by_year[str(year)] = {"denominator": int(len(part)), "numerator": int(part["numerator"].sum())}
    summary = {
        "kind": m.kind,
        "source": m.source,
        "direction": m.direction,
        "buckets": list(m.buckets),
        "candidates": int(len(cand)),
        "not_eligible": {r: int((status == r).sum()) for r in NOT_ELIGIBLE},
        "eligible": int(len(eligible)),
        "excluded": {r: int((exclusion == r).sum()) for r in m.exclusions},
        "denominator": int(len(den)),
        "numerator": int(den["numerator"].sum()),
        "with_reading": int(with_reading.sum()),
        "no_reading": int((~with_reading).sum()),
        "treated": int(len(n_tx)),
        "untreated": int(len(den) - len(n_tx)),
        "on_several_treatments": int((n_tx > 1).sum()),
        "units": int(len(units)),
        "by_treatment": by_tx,
        "by_year": by_year,
    }
    check_control_summary(summary)
    return units, summary


def check_control_summary(s: dict) -> None:
    """The counts of one control measure add up; a failure is a bug, never bad input."""
    assert s["candidates"] == sum(s["not_eligible"].values()) + s["eligible"], "candidates"
    assert s["eligible"] == sum(s["excluded"].values()) + s["denominator"], "eligible"
    assert s["denominator"] == s["with_reading"] + s["no_reading"] == s["treated"] + s["untreated"], "denominator"
    assert s["units"] == sum(t["units"] for t in s["by_treatment"].values()), "units"
    assert s["units"] >= s["denominator"] and s["numerator"] <= s["denominator"], "units"
    assert s["denominator"] == sum(y["denominator"] for y in s["by_year"].values()), "by_year"


def _visits(encounters: pd.DataFrame) -> pd.DataFrame:
    return encounters[~one_of(encounters["status"], IGNORED_VISIT_STATUS) & encounters["period_start"].notna().to_numpy()]


def control_data_end(observations: pd.DataFrame, encounters: pd.DataFrame) -> int:
    """The day number of the newest visit or observation (-1 without any): a year is complete when
    the data reach past its last day."""
    visit_days = day_number(_visits(encounters)["period_start"]).to_numpy()
    obs_days = day_number(observations["effective"].dropna()).to_numpy()
    return int(max([d.max() for d in (visit_days, obs_days) if len(d)], default=-1))


def derive_control_units(
    tables: dict[str, pd.DataFrame], links: pd.DataFrame, mapping: MappingSet, data_end: int | None = None
) -> tuple[pd.DataFrame, dict]:
    """Units of every control measure of ``mapping`` and, per measure, the counts that explain them.

    ``tables`` are the extract tables as UTC timestamps (``encounters`` included); ``links`` are the
    mapped requests linked to buckets (``linkage.link_requests``); ``data_end``: ``control_data_end``
    of the whole data when ``tables`` hold only some of its patients (default: of ``tables``)."""
    observations, encounters = tables["observations"], tables["encounters"]
    visits = _visits(encounters)
    visit_days = day_number(visits["period_start"]).to_numpy()
    if data_end is None:
        data_end = control_data_end(observations, encounters)
    years = _year_of(visit_days) if len(visit_days) else np.array([], dtype="int64")
    complete = _first_day(years + 1) <= data_end  # the data reach past the year's last day
    visit_years = pd.DataFrame({"patient_key": visits["patient_key"].to_numpy()[complete], "year": years[complete]})
    visit_years = visit_years.drop_duplicates()
    cond = mapped_conditions(tables["conditions"], mapping)
    patients = tables["patients"][["patient_key", "sex", "birth_date"]].drop_duplicates("patient_key")
    readings, reading_counts = _readings(observations, mapping)
    parts, summary = [], {}
    for m in mapping.control_measures.values():
        units, summary[m.id] = _measure_units(m, visit_years, cond, tables["conditions"], patients, readings, links,
                                              mapping)
        parts.append(units)
    units = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else None
    units = _typed(units) if units is not None else empty_units()
    units = units.sort_values(["measure", "treatment_code", "period", "unit_id"], kind="stable").reset_index(drop=True)
    last_complete = int(_year_of(np.array([data_end]))[0]) - 1 if data_end >= 0 else None
    return units, {"complete_years_through": last_complete, "measures": summary, "readings": reading_counts}
