"""Small, valid hand-built tables with the schemas of docs/architecture.md, for the quality tests."""

from __future__ import annotations

import hashlib

import pandas as pd


def key(text: str) -> str:
    """A 32-hex key, like ``Pseudonymizer.key`` makes."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def ts(text: str | None) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC") if text else pd.NaT


def _ts_col(values: list[str | None]) -> pd.Series:
    return pd.Series([ts(v) for v in values], dtype="datetime64[us, UTC]")


def good_tables(mapping) -> dict[str, pd.DataFrame]:
    p1, p2 = key("Patient/1"), key("Patient/2")
    patients = pd.DataFrame(
        {
            "patient_key": [p1, p2],
            "sex": ["female", "male"],
            "birth_date": _ts_col(["1950-03-01", None]),
            "deceased": _ts_col([None, None]),
        }
    )
    conditions = pd.DataFrame(
        {
            "condition_key": [key("Condition/1"), key("Condition/1"), key("Condition/2")],
            "patient_key": [p1, p1, p2],
            "code_system": ["http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm", "http://snomed.info/sct"],
            "code": ["38341003", "I10", "55822004"],
            "onset": _ts_col(["2015-01-01", "2015-01-01", "2016-05-05"]),
            "abatement": _ts_col([None, None, "2017-01-01"]),
            "clinical_status": ["active", "active", None],
        }
    )
    medication_requests = pd.DataFrame(
        {
            "request_key": [key("MedicationRequest/1"), key("MedicationRequest/2")],
            "patient_key": [p1, p2],
            "code_system": ["http://www.nlm.nih.gov/research/umls/rxnorm"] * 2,
            "code": ["316049", "316672"],
            "authored_on": _ts_col(["2015-02-01", "2016-06-01"]),
            "status": ["active", "stopped"],
            "intent": ["order", None],
            "reason_condition_keys": [[key("Condition/1")], []],
            "reason_codes": [[], ["http://snomed.info/sct|55822004"]],
        }
    )
    observations = pd.DataFrame(
        {
            "patient_key": [p1, p1, p2, p2],
            "code_system": ["http://loinc.org"] * 4,
            "code": ["8480-6", "8462-4", "2093-3", "39156-5"],
            "panel_code": ["55284-4", "55284-4", None, None],
            "value": [142.0, 88.0, 231.5, 27.3],
            "unit": ["mm[Hg]", "mm[Hg]", "mg/dL", "kg/m2"],
            "effective": _ts_col(["2015-01-20", "2015-01-20", "2016-05-20", "2016-05-20"]),
            "status": ["final"] * 4,
            "source_file": ["Observation.000.ndjson"] * 4,
            "source_line": [1, 1, 2, 3],
        }
    )
    encounters = pd.DataFrame(
        {
            "patient_key": [p1, p2, p2],
            "period_start": _ts_col(["2015-01-20T09:00", "2016-05-20T10:00", "2016-07-01T08:00"]),
            "period_end": _ts_col(["2015-01-20T09:30", "2016-05-20T10:20", None]),
            "class_code": ["AMB", "AMB", "EMER"],
            "status": ["finished", "finished", "in-progress"],
        }
    )
    tx = sorted(mapping.treatments)
    outcome_events = pd.DataFrame(
        {
            "event_id": [key("event/1"), key("event/2")],
            "patient_key": [p1, p2],
            "bucket": sorted(mapping.buckets)[:2],
            "treatment_code": tx[:2],
            "measure": ["systolic_bp", "total_cholesterol"],
            "start": _ts_col(["2015-02-01", "2016-06-01"]),
            "start_period": ["2015-02", "2016-06"],
            "age_band": ["65+", "unknown"],
            "sex": ["female", "male"],
            "baseline_value": [142.0, 231.5],
            "baseline_days": pd.Series([12, 12], dtype="int64"),
            "followup_value": [128.0, 180.25],
            "followup_days": pd.Series([60, 90], dtype="int64"),
            "change": [128.0 - 142.0, 180.25 - 231.5],
            "responded": [True, True],
            "mapping_version": [mapping.version] * 2,
            "mapping_hash": [mapping.content_hash] * 2,
        }
    )
    return {
        "patients": patients,
        "conditions": conditions,
        "medication_requests": medication_requests,
        "observations": observations,
        "encounters": encounters,
        "outcome_events": outcome_events,
    }


def without_times(report: dict) -> dict:
    """A report's ``to_dict()`` without its timings, the one part two runs never share."""
    for table in report["tables"].values():
        table.pop("seconds")
    return report
