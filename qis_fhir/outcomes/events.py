"""Treatment episodes and treatment-outcome events (see docs/outcomes.md for the definitions).

Flow: mapped requests -> linked to buckets -> episodes per (patient, treatment, bucket, measure)
split by the measure's episode gap -> baseline and follow-up look-ups -> one event per episode, or
one exclusion reason per episode. ``events + excluded == episodes`` always holds, per bucket and
per treatment too; the summary says why every episode that is not an event is not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qis_fhir.files import write_json
from qis_fhir.mapping import RXNORM, UNKNOWN, MappingSet
from qis_fhir.outcomes.ages import age_bands, age_years
from qis_fhir.outcomes.linkage import link_requests
from qis_fhir.outcomes.windows import day_number, find_values, measure_observations, measure_table, one_of

OUTCOME_EVENTS = "outcome_events.parquet"
OUTCOME_SUMMARY = "outcome_summary.json"

#: Output columns of ``outcome_events.parquet``, in order (docs/architecture.md).
EVENT_COLUMNS = [
    "event_id",
    "patient_key",
    "bucket",
    "treatment_code",
    "measure",
    "start",
    "start_period",
    "age_band",
    "sex",
    "baseline_value",
    "baseline_days",
    "followup_value",
    "followup_days",
    "change",
    "responded",
    "mapping_version",
    "mapping_hash",
]

#: Why an episode yields no event, checked in this order (the first that applies is counted).
EXCLUSION_REASONS = [
    "patient_unknown",  # the request's patient is not in the patients table
    "not_new_user",  # washout: a request of the same treatment in the washout_days before the start
    "short_history",  # washout: the patient's records begin less than washout_days before the start
    "baseline_unit_mismatch",  # no baseline in the measure's unit, but one in another unit
    "baseline_implausible",  # no baseline in the measure's plausible range, but one outside it
    "no_baseline",  # no value at all in the baseline window
    "followup_unit_mismatch",
    "followup_implausible",
    "followup_pending",  # no follow-up yet and the window ends after the newest observation in the data
    "no_followup",
]


@dataclass
class OutcomeResult:
    events: pd.DataFrame
    summary: dict = field(default_factory=dict)
    units: pd.DataFrame | None = None  # control units, when the mapping declares control measures

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``outcome_events.parquet`` and ``outcome_summary.json`` (the run's and the asset's files),
        and ``control_units.parquet`` when the mapping has control measures."""
        from qis_fhir.outcomes.control import CONTROL_UNITS

        out_dir = Path(out_dir)
        events_path, summary_path = out_dir / OUTCOME_EVENTS, out_dir / OUTCOME_SUMMARY
        self.events.to_parquet(events_path, index=False)
        if self.units is not None:
            self.units.to_parquet(out_dir / CONTROL_UNITS, index=False)
        write_json(summary_path, self.summary)
        return events_path, summary_path


def outcome_table_paths(folder: Path | str, mapping: MappingSet) -> dict[str, Path]:
    """The outcome tables ``OutcomeResult.write`` left in ``folder``: ``outcome_events``, and
    ``control_units`` when ``mapping`` declares control measures (then a missing file is an error:
    the control cells would silently vanish from the packets)."""
    from qis_fhir.errors import InputNotFoundError
    from qis_fhir.outcomes.control import CONTROL_UNITS

    folder = Path(folder)
    paths = {"outcome_events": folder / OUTCOME_EVENTS}
    if mapping.control_measures:
        paths["control_units"] = folder / CONTROL_UNITS
    for path in paths.values():
        if not path.exists():
            raise InputNotFoundError(f"{path} does not exist: derive the outcomes with mapping {mapping.version} first")
    return paths


def read_outcome_tables(folder: Path | str, mapping: MappingSet) -> dict[str, pd.DataFrame]:
    """The tables of ``outcome_table_paths``, read."""
    return {name: pd.read_parquet(path) for name, path in outcome_table_paths(folder, mapping).items()}


def _episodes(links: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """One row per episode: requests of one patient+treatment+bucket(+measure) less than the gap apart."""
    bm = pd.DataFrame(
        [(b.id, m) for b in mapping.buckets.values() for m in b.measures], columns=["bucket", "measure"]
    ).astype("object")
    gaps = pd.DataFrame(
        [(m.id, m.episode_gap_days) for m in mapping.measures.values()], columns=["measure", "gap"]
    ).astype({"measure": "object"})
    req = links.merge(bm, on="bucket").merge(gaps, on="measure")
    req = req.assign(day=day_number(req["authored_on"]).to_numpy())
    keys = ["patient_key", "treatment_code", "bucket", "measure"]
    req = req.sort_values(keys + ["authored_on", "request_key"], kind="stable").reset_index(drop=True)
    same_group = (req[keys] == req[keys].shift()).all(axis=1)
    new = ~same_group | (req["day"] - req["day"].shift() >= req["gap"])
    req["episode_id"] = new.cumsum()
    first = req[new.to_numpy()].copy()
    first["requests"] = req.groupby("episode_id").size().reindex(first["episode_id"]).to_numpy()
    return first.rename(columns={"authored_on": "start", "day": "start_day"})[
        keys + ["episode_id", "start", "start_day", "link", "requests"]
    ].reset_index(drop=True)


def row_ids(*columns: pd.Series) -> list[str]:
    """32 hex of sha256 over the row's values joined by ``|``: an id stable across runs and input order.
    Events and units, not observations: a comprehension over a few thousand rows is fine."""
    return [hashlib.sha256("|".join(p).encode()).hexdigest()[:32] for p in zip(*columns)]


def _event_ids(df: pd.DataFrame) -> list[str]:
    starts = df["start"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return row_ids(df["patient_key"], df["treatment_code"], df["bucket"], df["measure"], starts)


def _ensure_utc(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Timestamps as tz-aware UTC (naive ones are taken as UTC); copies only when a column changes."""
    changed = {}
    for c in cols:
        s = df[c]
        if not isinstance(s.dtype, pd.DatetimeTZDtype) or str(s.dt.tz) != "UTC":
            s = pd.to_datetime(s)
            changed[c] = s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")
    return df.assign(**changed) if changed else df


def empty_events() -> pd.DataFrame:
    return _typed(pd.DataFrame({c: [] for c in EVENT_COLUMNS}))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[EVENT_COLUMNS].copy()
    for c in ["event_id", "patient_key", "bucket", "treatment_code", "measure", "start_period", "age_band", "sex",
              "mapping_version", "mapping_hash"]:
        df[c] = df[c].astype("str")
    df["start"] = pd.to_datetime(df["start"], utc=True).astype("datetime64[us, UTC]")
    for c in ["baseline_value", "followup_value", "change"]:
        df[c] = df[c].astype("float64")
    for c in ["baseline_days", "followup_days"]:
        df[c] = df[c].astype("int64")
    df["responded"] = df["responded"].astype(bool)
    return df.reset_index(drop=True)


def data_ends(tables: dict[str, pd.DataFrame], mapping: MappingSet) -> dict[str, float]:
    """The day numbers where the data end, as ``derive_outcome_events`` finds them in ``tables``:
    ``events``, the newest reading of a measure (a follow-up window ending later is still pending),
    and ``control``, the newest visit or observation (the last complete year ends before it).

    A run that derives its outcomes shard by shard (``outcomes/sharded.py``) takes the maximum of
    each over the shards and passes it to every shard, since a shard's own data may end earlier."""
    obs, _ = measure_observations(_ensure_utc(tables["observations"], ["effective"]), mapping)
    ends = {"events": float(obs["obs_day"].max()) if len(obs) else -np.inf}
    if mapping.control_measures:
        from qis_fhir.outcomes.control import control_data_end

        ends["control"] = control_data_end(_ensure_utc(tables["observations"], ["effective"]),
                                           _ensure_utc(tables["encounters"], ["period_start", "period_end"]))
    return ends


def derive_outcome_events(tables: dict[str, pd.DataFrame], mapping: MappingSet, ends: dict[str, float] | None = None) -> OutcomeResult:
    """Treatment-outcome events from the extract tables (``patients``, ``conditions``,
    ``medication_requests``, ``observations``), one per treatment episode with a baseline and a
    follow-up value; every other episode is counted under one exclusion reason in ``summary``.
    A mapping with control measures also gives ``units`` (``control.py``, which reads ``encounters``
    too) and ``summary["control"]``. ``ends``: ``data_ends`` of the whole data when ``tables`` hold
    only some of its patients (default: the ends of ``tables``)."""
    patients = _ensure_utc(tables["patients"], ["birth_date"])
    conditions = _ensure_utc(tables["conditions"], ["onset", "abatement"])
    requests = _ensure_utc(tables["medication_requests"], ["authored_on"])
    observations = _ensure_utc(tables["observations"], ["effective"])

    links, link_counts = link_requests(requests, conditions, mapping)
    episodes = _episodes(links, mapping)
    obs, obs_counts = measure_observations(observations, mapping)

    episodes = episodes.merge(measure_table(mapping)[["measure", "measure_idx", "baseline_window", "followup_min",
                                                      "followup_max"]], on="measure")
    episodes["patient_key"] = episodes["patient_key"].astype(obs["patient_key"].dtype)
    ep = find_values(episodes, obs)
    pat = patients[["patient_key", "sex", "birth_date"]].drop_duplicates("patient_key")
    ep = ep.merge(pat.assign(_known=True), on="patient_key", how="left")
    ep = _washout(ep, requests, mapping, {**tables, "conditions": conditions, "medication_requests": requests,
                                          "observations": observations})

    data_end = ends["events"] if ends is not None else (obs["obs_day"].max() if len(obs) else -np.inf)
    reason = np.select(
        [
            ep["_known"].isna().to_numpy(),
            ep["prior_request"].to_numpy(),
            ep["short_history"].to_numpy(),
            ep["baseline_mismatch"].to_numpy(),
            ep["baseline_implausible"].to_numpy(),
            ep["baseline_value"].isna().to_numpy(),
            ep["followup_mismatch"].to_numpy(),
            ep["followup_implausible"].to_numpy(),
            (ep["followup_value"].isna() & (ep["start_day"] + ep["followup_max"] > data_end)).to_numpy(),
            ep["followup_value"].isna().to_numpy(),
        ],
        EXCLUSION_REASONS,
        default="",
    )
    ep["exclusion"] = reason
    directions = {m.id: (m.direction == "lower", m.threshold) for m in mapping.measures.values()}
    ep["change"] = ep["followup_value"] - ep["baseline_value"]
    lower = ep["measure"].map(lambda m: directions[m][0]).astype(bool)
    threshold = ep["measure"].map(lambda m: directions[m][1]).astype("float64")
    ep["responded"] = np.where(lower, ep["change"] <= -threshold, ep["change"] >= threshold) & (ep["exclusion"] == "")
    ev = ep[ep["exclusion"] == ""].copy()
    ev["baseline_days"] = ev["start_day"] - ev["baseline_day"]
    ev["followup_days"] = ev["followup_day"] - ev["start_day"]
    ev["start_period"] = ev["start"].dt.strftime("%Y-%m")
    ev["age_band"] = age_bands(age_years(ev["start"], ev["birth_date"]), mapping)
    ev["sex"] = ev["sex"].where(ev["sex"].isin(mapping.cohorts.sexes), UNKNOWN).fillna(UNKNOWN)
    ev["mapping_version"] = mapping.version
    ev["mapping_hash"] = mapping.content_hash
    ev["event_id"] = _event_ids(ev) if len(ev) else []
    events = _typed(ev) if len(ev) else empty_events()
    events = events.sort_values(["bucket", "treatment_code", "start", "event_id"], kind="stable").reset_index(drop=True)

    summary = _summary(ep, events, mapping, link_counts, obs_counts)
    if mapping.treatment_classes:
        summary["treatment_classes"] = class_coverage(requests, mapping)
    units = None
    if mapping.control_measures:
        from qis_fhir.outcomes.control import derive_control_units

        ctables = {"patients": patients, "conditions": conditions, "observations": observations,
                   "encounters": _ensure_utc(tables["encounters"], ["period_start", "period_end"])}
        units, summary["control"] = derive_control_units(ctables, links, mapping, None if ends is None else ends["control"])
    return OutcomeResult(events=events, summary=summary, units=units)


def class_coverage(requests: pd.DataFrame, mapping: MappingSet) -> dict[str, dict]:
    """Per class of ``treatment_classes``: how many requests carry one of its RxNorm codes, how many
    of those the mapping leaves unmapped, and the unmapped count per code. Codes of the YAML list
    and counts only: never a display text, key or date of the record. Every request counts,
    whatever its status: the question is which prescriptions the mapping cannot see."""
    rx = requests[one_of(requests["code_system"], [RXNORM])]
    counts = rx["code"].astype("object").value_counts()
    out = {}
    for name, codes in mapping.treatment_classes.items():
        seen = {c: int(counts.get(c, 0)) for c in codes}
        unmapped = {c: n for c, n in sorted(seen.items()) if n and mapping.treatment_for(RXNORM, c) is None}
        out[name] = {"requests": sum(seen.values()), "unmapped": sum(unmapped.values()), "unmapped_codes": unmapped}
    return out


#: The dated records that show a patient is under observation, for the new-user washout: the
#: patient's earliest one marks where the extract's history of that patient begins. A birth date is
#: not a record (every patient has one), nor is an abatement or a deceased date.
HISTORY_COLUMNS = {"conditions": "onset", "medication_requests": "authored_on", "observations": "effective",
                   "encounters": "period_start"}


def first_record_days(tables: dict[str, pd.DataFrame]) -> pd.Series:
    """Per patient_key, the day number of the earliest dated record in ``HISTORY_COLUMNS``' tables
    (a table absent from ``tables`` counts as empty)."""
    parts = []
    for name, col in HISTORY_COLUMNS.items():
        table = tables.get(name)
        if table is None:
            continue
        table = table.dropna(subset=[col])
        parts.append(pd.DataFrame({"patient_key": table["patient_key"].astype("object").to_numpy(),
                                   "day": day_number(pd.to_datetime(table[col], utc=True)).to_numpy()}))
    if not parts:
        return pd.Series(dtype="int64")
    return pd.concat(parts, ignore_index=True).groupby("patient_key")["day"].min()


def _washout(ep: pd.DataFrame, requests: pd.DataFrame, mapping: MappingSet, tables: dict) -> pd.DataFrame:
    """Flag the episodes that are not a new user's start when the mapping declares a washout:
    ``prior_request`` when the patient has a request of the same treatment (any request of its RxNorm
    codes, linked to a condition or not) on one of the ``washout_days`` days before the start day,
    ``short_history`` when the patient's first record (``first_record_days``) is less than
    ``washout_days`` before it. A mapping without ``washout_days`` (v1) flags nothing."""
    ep = ep.assign(prior_request=False, short_history=False)
    w = mapping.washout_days
    if w is None or ep.empty:
        return ep
    treated = requests.dropna(subset=["authored_on"]).merge(mapping.treatment_code_table(),
                                                             on=["code_system", "code"])
    treated = pd.DataFrame({"patient_key": treated["patient_key"].astype("object").to_numpy(),
                            "treatment_code": treated["treatment_code"].to_numpy(),
                            "req_day": day_number(treated["authored_on"]).to_numpy()})
    cand = ep[["episode_id", "patient_key", "treatment_code", "start_day"]].assign(
        patient_key=lambda d: d["patient_key"].astype("object"))
    pairs = cand.merge(treated, on=["patient_key", "treatment_code"])
    before = pairs["start_day"] - pairs["req_day"]
    prior = set(pairs.loc[(before >= 1) & (before <= w), "episode_id"])
    first = cand["patient_key"].map(first_record_days(tables))
    short = set(cand.loc[(cand["start_day"] - first < w).fillna(True).to_numpy(), "episode_id"])
    return ep.assign(prior_request=ep["episode_id"].isin(prior).to_numpy(),
                     short_history=ep["episode_id"].isin(short).to_numpy())


def _counts(ep: pd.DataFrame, key: str, ids: list[str]) -> dict[str, dict]:
    out = {}
    for i in ids:
        part = ep[ep[key] == i]
        out[i] = {
            "episodes": int(len(part)),
            "events": int((part["exclusion"] == "").sum()),
            "responded": int(part["responded"].sum()),
            "excluded": {r: int((part["exclusion"] == r).sum()) for r in EXCLUSION_REASONS},
        }
    return out


def _summary(
    ep: pd.DataFrame, events: pd.DataFrame, mapping: MappingSet, link_counts: dict, obs_counts: dict
) -> dict:
    """Counts only: no patient key, date or value (the summary is written beside the packets)."""
    excluded = {r: int((ep["exclusion"] == r).sum()) for r in EXCLUSION_REASONS}
    return {
        "mapping_version": mapping.version,
        "mapping_hash": mapping.content_hash,
        "totals": {
            **link_counts,
            "episodes": int(len(ep)),
            "events": int(len(events)),
            "excluded": int(sum(excluded.values())),
            "responded": int(events["responded"].sum()) if len(events) else 0,
        },
        "exclusion_reasons": excluded,
        "by_bucket": _counts(ep, "bucket", sorted(mapping.buckets)),
        "by_treatment": _counts(ep, "treatment_code", sorted(mapping.treatments)),
        "by_measure": _counts(ep, "measure", sorted(mapping.measures)),
        "episodes_by_link": {k: int((ep["link"] == k).sum()) for k in ("reference", "time")},
        "observations": obs_counts,
    }
