"""Link mapped medication requests to the condition bucket they treat.

A request names its reason (``reasonReference`` to a Condition, or a ``reasonCode``) or it does
not. When it does, the stated reason decides: the request links to the referenced conditions'
buckets that its treatment treats, and to nothing else. When it names no reason we can resolve, the
request links by patient and time to every bucket its treatment treats in which the patient has a
condition with onset on or before the request (plus ``ONSET_TOLERANCE``) that has not abated before it.
All of it is merges on whole columns: no Python loop over rows.
"""

from __future__ import annotations

import pandas as pd

from qis_fhir.mapping import MappingSet

#: A condition recorded up to this long after the request still explains it: Synthea and EHRs often
#: write the diagnosis and the prescription of one encounter with timestamps seconds or hours apart.
ONSET_TOLERANCE = pd.Timedelta(days=1)

#: Request statuses that mean the drug was never (validly) prescribed.
IGNORED_REQUEST_STATUS = frozenset({"entered-in-error", "cancelled", "draft"})

def _member(series: pd.Series, keys: pd.Index) -> pd.Series:
    """``series.isin(keys)`` through an object hash table (Arrow strings' ``isin`` builds Python lists)."""
    return pd.Series(pd.Index(keys.unique()).astype(object).get_indexer(series.astype(object)) >= 0, index=series.index)


LINK_COLUMNS = ["request_key", "patient_key", "treatment_code", "bucket", "authored_on", "status", "link"]


def mapped_conditions(conditions: pd.DataFrame, mapping: MappingSet) -> pd.DataFrame:
    """Conditions whose coding the mapping covers: condition_key, patient_key, bucket, onset, abatement."""
    cols = ["condition_key", "patient_key", "code_system", "code", "onset", "abatement"]
    cond = mapping.with_buckets(conditions[cols])
    # a Condition with both a SNOMED and an ICD-10-CM coding of one bucket is still one condition
    return cond.drop(columns=["code_system", "code"]).drop_duplicates(["condition_key", "bucket"])


def _explode_list(df: pd.DataFrame, key: str, column: str, name: str) -> pd.DataFrame:
    """(key, one element of the list column) per element; empty lists and nulls yield no row."""
    out = df[[key, column]].explode(column).dropna(subset=[column])
    return out.rename(columns={column: name})


def link_requests(
    requests: pd.DataFrame, conditions: pd.DataFrame, mapping: MappingSet
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Mapped requests linked to buckets (one row per request x bucket) and counts of what was not.

    Returns ``(links, counts)``: ``links`` has ``LINK_COLUMNS``; ``counts`` has ``requests``,
    ``requests_mapped``, ``requests_ignored_status``, ``requests_linked``, ``unlinked_no_condition``,
    ``unlinked_reason_not_treated``, ``linked_by_reference``, ``linked_by_time``.
    """
    counts = {"requests": int(len(requests))}
    tx_codes = mapping.treatment_code_table()
    req = requests.merge(tx_codes, on=["code_system", "code"], how="inner")
    ignored = req["status"].isin(IGNORED_REQUEST_STATUS) | req["authored_on"].isna()
    counts["requests_ignored_status"] = int(ignored.sum())
    req = req[~ignored]
    counts["requests_mapped"] = int(len(req))

    treats = pd.DataFrame(
        [(t.id, b) for t in mapping.treatments.values() for b in t.buckets], columns=["treatment_code", "bucket"]
    ).astype("object")
    cond = mapped_conditions(conditions, mapping)

    # Stated reasons: referenced Conditions we know, and reasonCode codings ("system|code").
    refs = _explode_list(req, "request_key", "reason_condition_keys", "condition_key")
    known_refs = refs.merge(conditions[["condition_key"]].drop_duplicates(), on="condition_key", how="inner")
    ref_buckets = known_refs.merge(cond[["condition_key", "bucket"]], on="condition_key", how="inner")
    stated_keys = pd.Index(known_refs["request_key"])
    code_buckets = pd.DataFrame(columns=["request_key", "bucket"])
    if "reason_codes" in req.columns:
        rcodes = _explode_list(req, "request_key", "reason_codes", "reason_code")
        split = rcodes["reason_code"].astype(str).str.split("|", n=1, expand=True)
        if len(rcodes) and split.shape[1] == 2:
            rcodes = rcodes.assign(code_system=split[0].values, code=split[1].values)
            code_buckets = mapping.with_buckets(rcodes)
        stated_keys = stated_keys.union(pd.Index(rcodes["request_key"]))
    stated_buckets = pd.concat(
        [ref_buckets[["request_key", "bucket"]], code_buckets[["request_key", "bucket"]]], ignore_index=True
    ).drop_duplicates()

    base = req[["request_key", "patient_key", "treatment_code", "authored_on", "status"]]
    stated = base[_member(base["request_key"], stated_keys)]
    by_ref = stated.merge(stated_buckets, on="request_key").merge(treats, on=["treatment_code", "bucket"])
    by_ref = by_ref.assign(link="reference")

    unstated = base[~_member(base["request_key"], stated_keys)]
    cand = unstated.merge(treats, on="treatment_code").merge(
        cond[["patient_key", "bucket", "onset", "abatement"]], on=["patient_key", "bucket"]
    )
    active = (cand["onset"] <= cand["authored_on"] + ONSET_TOLERANCE) & (
        cand["abatement"].isna() | (cand["abatement"] >= cand["authored_on"])
    )
    by_time = cand[active].drop_duplicates(["request_key", "bucket"]).assign(link="time")

    links = pd.concat([by_ref[LINK_COLUMNS], by_time[LINK_COLUMNS]], ignore_index=True)
    linked = pd.Index(links["request_key"].unique())
    counts["requests_linked"] = int(len(linked))
    counts["unlinked_reason_not_treated"] = int((~_member(stated["request_key"], linked)).sum())
    counts["unlinked_no_condition"] = int((~_member(unstated["request_key"], linked)).sum())
    counts["linked_by_reference"] = int(by_ref["request_key"].nunique())
    counts["linked_by_time"] = int(by_time["request_key"].nunique())
    return links, counts
