"""Day arithmetic and the baseline / follow-up look-ups around each episode start.

Windows are whole calendar days in UTC: day 0 is the start day. The look-ups are ``merge_asof``
joins by (patient, measure), so millions of observations cost a sort and a merge, not a loop.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qis_fhir.mapping import LOINC, MappingSet

#: Observation statuses whose values must not be used.
IGNORED_OBSERVATION_STATUS = frozenset({"entered-in-error", "cancelled"})

#: What a kept reading is (``reading`` column of ``measure_observations``, one int8 a row): usable,
#: or only an explanation of why a window holds no usable one. Names: its count in the summary's
#: ``observations`` and, for the explanations, the prefix of its columns in ``find_values``.
USABLE, UNIT_MISMATCH, IMPLAUSIBLE = 0, 1, 2
READING_NAMES = {UNIT_MISMATCH: "unit_mismatch", IMPLAUSIBLE: "implausible", USABLE: "used"}


def one_of(series: pd.Series, values) -> np.ndarray:
    """``series.isin(values)`` for a handful of values, as boolean numpy (nulls False).

    Equality per value stays vectorised on Arrow-backed strings, where ``isin`` builds Python lists.
    """
    out = np.zeros(len(series), dtype=bool)
    for v in values:
        out |= (series == v).fillna(False).to_numpy(dtype=bool)
    return out


def day_number(ts: pd.Series) -> pd.Series:
    """Days since 1970-01-01 of each timestamp's UTC calendar day (naive timestamps are taken as UTC)."""
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    return pd.Series(ts.values.astype("datetime64[D]").astype("int64"), index=ts.index)


def measure_table(mapping: MappingSet) -> pd.DataFrame:
    rows = [
        (m.id, i, m.loinc, m.unit, m.plausible_min, m.plausible_max, m.baseline_days, m.followup_min_days,
         m.followup_max_days)
        for i, m in enumerate(mapping.measures.values())
    ]
    cols = ["measure", "measure_idx", "code", "measure_unit", "plausible_min", "plausible_max", "baseline_window",
            "followup_min", "followup_max"]
    return pd.DataFrame(rows, columns=cols).astype({"measure": "object", "code": "object", "measure_unit": "object"})


def measure_observations(observations: pd.DataFrame, mapping: MappingSet) -> tuple[pd.DataFrame, dict[str, int]]:
    """Observation values of the mapped measures, with ``reading`` and ``obs_day``; counts of what was dropped.

    A row belongs to a measure when its LOINC code is the measure's and it stands alone or sits in
    one of the measure's panels. Values without a number or with an ignored status are dropped and
    counted. Values in another unit (``reading`` UNIT_MISMATCH) or outside the measure's
    ``plausible_range`` (IMPLAUSIBLE: an HbA1c of 26 %, a typo or another scale) are counted and kept
    only so the episodes they would have served are excluded as ``*_unit_mismatch`` or
    ``*_implausible`` rather than ``no_*``: they are never a baseline or follow-up.
    """
    panels = [(m.id, p) for m in mapping.measures.values() for p in m.panels]
    return select_readings(observations, measure_table(mapping), panels)


def select_readings(
    observations: pd.DataFrame, mt: pd.DataFrame, panel_pairs: list[tuple[str, str]]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rules of ``measure_observations`` for any series of readings: ``mt`` has a row per series
    (measure, measure_idx = its row number, code, measure_unit, plausible_min, plausible_max) and
    ``panel_pairs`` the (measure, panel code) pairs a component may sit in. The change measures and
    the readings of the control measures (``control.py``) are both selected here."""
    wanted = one_of(observations["code"], mt["code"].unique()) & one_of(observations["code_system"], [LOINC])
    obs = observations[wanted]
    obs = obs[["patient_key", "code", "panel_code", "value", "unit", "effective", "status"]].merge(
        mt[["measure", "measure_idx", "code", "measure_unit"]], on="code", how="inner"
    )
    panels = pd.DataFrame(panel_pairs, columns=["measure", "panel_code"]).astype("object")
    in_panel = obs[["measure", "panel_code"]].merge(panels.assign(_ok=True), on=["measure", "panel_code"], how="left")
    panel_ok = obs["panel_code"].isna().to_numpy() | in_panel["_ok"].notna().to_numpy()
    counts = {"candidates": int(len(obs)), "other_panel": int((~panel_ok).sum())}
    obs = obs[panel_ok]
    bad_status = one_of(obs["status"], IGNORED_OBSERVATION_STATUS)
    no_value = (obs["value"].isna() | obs["effective"].isna()).to_numpy()
    counts["ignored_status"] = int(bad_status.sum())
    counts["missing_value_or_date"] = int((no_value & ~bad_status).sum())
    obs = obs[~bad_status & ~no_value]
    unit_ok = (obs["unit"] == obs["measure_unit"]).fillna(False).to_numpy(dtype=bool)
    idx, value = obs["measure_idx"].to_numpy(), obs["value"].to_numpy(dtype="float64")
    in_range = (value >= mt["plausible_min"].to_numpy(dtype="float64")[idx]) & (
        value <= mt["plausible_max"].to_numpy(dtype="float64")[idx]
    )
    reading = np.select([~unit_ok, ~in_range], [UNIT_MISMATCH, IMPLAUSIBLE], default=USABLE).astype("int8")
    counts.update({name: int((reading == kind).sum()) for kind, name in READING_NAMES.items()})
    obs = obs.assign(reading=reading, obs_day=day_number(obs["effective"]).to_numpy())
    return obs[["patient_key", "measure", "measure_idx", "value", "effective", "obs_day", "reading"]], counts


def _asof(episodes: pd.DataFrame, obs: pd.DataFrame, left_day: str, direction: str, prefix: str) -> pd.DataFrame:
    """For each episode, the observation nearest ``left_day`` in ``direction`` (same patient and measure).

    ``series`` is one integer per (patient, measure): joining by an int is several times faster than
    by two string columns at millions of rows. One value per (series, day) first: the last of the day
    looking back, the first looking forward, so same-day values resolve by their timestamps and not by
    input order.
    """
    keep = "last" if direction == "backward" else "first"
    day_col, value_col = f"{prefix}_day", f"{prefix}_value"
    left = episodes[["episode_id", "series", left_day]].sort_values(left_day, kind="stable")
    if left.empty or obs.empty:
        return pd.DataFrame({"episode_id": left["episode_id"].to_numpy(), day_col: np.nan, value_col: np.nan})
    right = (
        obs.sort_values(["obs_day", "effective"], kind="stable")
        .drop_duplicates(["series", "obs_day"], keep=keep)[["series", "obs_day", "value"]]
        .rename(columns={"obs_day": day_col, "value": value_col})
    )
    merged = pd.merge_asof(left, right, left_on=left_day, right_on=day_col, by="series", direction=direction)
    return merged[["episode_id", day_col, value_col]]


def find_values(episodes: pd.DataFrame, obs: pd.DataFrame) -> pd.DataFrame:
    """Add baseline / follow-up values and days (NaN when none) to ``episodes``, from usable readings
    only, and for a window without one whether it holds a reading in another unit
    (``baseline_mismatch``, ``followup_mismatch``) or outside the plausible range
    (``baseline_implausible``, ``followup_implausible``).

    ``episodes`` needs episode_id, patient_key, measure_idx, start_day, baseline_window, followup_min,
    followup_max. Baseline: latest value on days [start - baseline_window, start]. Follow-up: first
    value on days [start + followup_min, start + followup_max]. Each kind of reading is looked up on its
    own, so an implausible reading nearer the start never hides a usable one further off.
    """
    codes, _ = pd.factorize(pd.concat([episodes["patient_key"], obs["patient_key"]], ignore_index=True))
    n_measures = int(max(episodes["measure_idx"].max() if len(episodes) else 0,
                         obs["measure_idx"].max() if len(obs) else 0)) + 1
    ep = episodes.assign(
        series=codes[: len(episodes)] * n_measures + episodes["measure_idx"].to_numpy(),
        fu_from=episodes["start_day"] + episodes["followup_min"],
    )
    obs = obs.assign(series=codes[len(episodes):] * n_measures + obs["measure_idx"].to_numpy())
    out = ep
    for kind in (USABLE, UNIT_MISMATCH, IMPLAUSIBLE):
        src, tag = obs[obs["reading"].to_numpy() == kind], "" if kind == USABLE else f"{READING_NAMES[kind]}_"
        base = _asof(ep, src, "start_day", "backward", f"{tag}baseline")
        fu = _asof(ep, src, "fu_from", "forward", f"{tag}followup")
        out = out.merge(base, on="episode_id", how="left").merge(fu, on="episode_id", how="left")
        b_ok = (out["start_day"] - out[f"{tag}baseline_day"]) <= out["baseline_window"]
        f_ok = (out[f"{tag}followup_day"] - out["start_day"]) <= out["followup_max"]
        out.loc[~b_ok.fillna(False).astype(bool), [f"{tag}baseline_day", f"{tag}baseline_value"]] = np.nan
        out.loc[~f_ok.fillna(False).astype(bool), [f"{tag}followup_day", f"{tag}followup_value"]] = np.nan
    drop = ["series", "fu_from"]
    for kind, flag in ((UNIT_MISMATCH, "mismatch"), (IMPLAUSIBLE, "implausible")):
        for window in ("baseline", "followup"):
            found = f"{READING_NAMES[kind]}_{window}"
            out[f"{window}_{flag}"] = out[f"{window}_value"].isna() & out[f"{found}_day"].notna()
            drop += [f"{found}_day", f"{found}_value"]
    return out.drop(columns=drop)
