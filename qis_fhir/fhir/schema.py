"""The five extract tables: their Arrow schemas, in the column order of docs/architecture.md.

Row tuples built by ``fields.py`` follow exactly this column order; ``TABLES`` is the one place the
order is written down.
"""

from __future__ import annotations

import pyarrow as pa

from qis_fhir.fhir import TABLE_NAMES

TS = pa.timestamp("us", tz="UTC")

TABLES: dict[str, pa.Schema] = {
    "patients": pa.schema(
        [
            ("patient_key", pa.string()),
            ("sex", pa.string()),
            ("birth_date", TS),
            ("deceased", TS),
        ]
    ),
    "conditions": pa.schema(
        [
            ("condition_key", pa.string()),
            ("patient_key", pa.string()),
            ("code_system", pa.string()),
            ("code", pa.string()),
            ("onset", TS),
            ("abatement", TS),
            ("clinical_status", pa.string()),
        ]
    ),
    "medication_requests": pa.schema(
        [
            ("request_key", pa.string()),
            ("patient_key", pa.string()),
            ("code_system", pa.string()),
            ("code", pa.string()),
            ("authored_on", TS),
            ("status", pa.string()),
            ("intent", pa.string()),
            ("reason_condition_keys", pa.list_(pa.string())),
            ("reason_codes", pa.list_(pa.string())),
        ]
    ),
    "observations": pa.schema(
        [
            ("patient_key", pa.string()),
            ("code_system", pa.string()),
            ("code", pa.string()),
            ("panel_code", pa.string()),
            ("value", pa.float64()),
            ("unit", pa.string()),
            ("effective", TS),
            ("status", pa.string()),
            # provenance: the export file (as in summary.json) and its line, or Bundle entry number
            ("source_file", pa.string()),
            ("source_line", pa.int64()),
        ]
    ),
    # visits: only what a measure's denominator needs (who, when, what kind); no type, reason or text
    "encounters": pa.schema(
        [
            ("patient_key", pa.string()),
            ("period_start", TS),
            ("period_end", TS),
            ("class_code", pa.string()),
            ("status", pa.string()),
        ]
    ),
}

if tuple(TABLES) != TABLE_NAMES:
    raise RuntimeError(f"schema.TABLES {tuple(TABLES)} differs from qis_fhir.fhir.TABLE_NAMES {TABLE_NAMES}")

# resource type -> the table its rows go to
TABLE_OF_TYPE: dict[str, str] = {
    "Patient": "patients",
    "Condition": "conditions",
    "MedicationRequest": "medication_requests",
    "Observation": "observations",
    "Encounter": "encounters",
}
