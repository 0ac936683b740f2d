"""Hand-built extract tables with exactly the columns and dtypes of docs/architecture.md."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from qis_fhir.fhir.schema import TABLES
from qis_fhir.mapping import LOINC, RXNORM, SNOMED

# the extractor's own schemas: hand-built tables cannot drift from what extract writes
SCHEMAS = TABLES

START = pd.Timestamp("2020-03-01T09:00:00Z")


def day(offset: int, hour: int = 9) -> pd.Timestamp:
    """START's calendar day shifted by ``offset`` days, at ``hour`` UTC."""
    return START.normalize() + pd.Timedelta(days=offset, hours=hour)


class Tables:
    """Builder: add rows with defaults that make one hypertension + HCTZ episode easy to write."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {name: [] for name in SCHEMAS}
        self._n = 0

    def _key(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}"

    def patient(self, key="p1", sex="female", birth="1960-06-15") -> str:
        birth_ts = pd.Timestamp(birth, tz="UTC") if birth else None
        self.rows["patients"].append({"patient_key": key, "sex": sex, "birth_date": birth_ts, "deceased": None})
        return key

    def condition(self, patient="p1", code="38341003", system=SNOMED, onset=-365, abatement=None, key=None) -> str:
        key = key or self._key("c")
        self.rows["conditions"].append(
            {
                "condition_key": key,
                "patient_key": patient,
                "code_system": system,
                "code": code,
                "onset": day(onset) if isinstance(onset, int) else onset,
                "abatement": day(abatement) if isinstance(abatement, int) else abatement,
                "clinical_status": "active" if abatement is None else "resolved",
            }
        )
        return key

    def request(self, patient="p1", code="316049", when=0, reasons=(), reason_codes=(), status="active", key=None) -> str:
        key = key or self._key("r")
        self.rows["medication_requests"].append(
            {
                "request_key": key,
                "patient_key": patient,
                "code_system": RXNORM,
                "code": code,
                "authored_on": day(when) if isinstance(when, int) else when,
                "status": status,
                "intent": "order",
                "reason_condition_keys": list(reasons),
                "reason_codes": list(reason_codes),
            }
        )
        return key

    def obs(self, patient="p1", when=0, value=150.0, code="8480-6", unit="mm[Hg]", panel="55284-4", hour=9,
            status="final") -> None:
        self.rows["observations"].append(
            {
                "patient_key": patient,
                "code_system": LOINC,
                "code": code,
                "panel_code": panel,
                "value": value,
                "unit": unit,
                "effective": day(when, hour) if isinstance(when, int) else when,
                "status": status,
                "source_file": "Observation.ndjson",
                "source_line": len(self.rows["observations"]) + 1,
            }
        )

    def visit(self, patient="p1", when=0, status="finished", cls="AMB") -> None:
        start = day(when) if isinstance(when, int) else when
        self.rows["encounters"].append(
            {"patient_key": patient, "period_start": start, "period_end": start + pd.Timedelta(minutes=20),
             "class_code": cls, "status": status}
        )

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {}
        for name, schema in SCHEMAS.items():
            rows = self.rows[name]
            cols = {f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in schema}
            out[name] = pa.table(cols, schema=schema).to_pandas()
        return out


@pytest.fixture
def tb() -> Tables:
    return Tables()




@pytest.fixture
def tables_cls() -> type[Tables]:
    """The builder class itself, for tests that build many table sets (hypothesis)."""
    return Tables


@pytest.fixture
def day0() -> pd.Timestamp:
    return day(0, hour=0)
