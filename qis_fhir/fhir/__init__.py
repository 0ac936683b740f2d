"""fhir stage of qis-fhir: extract a FHIR export into typed, pseudonymous Parquet tables.

Public API (see docs/extract.md and docs/architecture.md)::

    extract_export(export_dir, out_dir, *, secret, validate="sample", sample_rate=0.002, progress=False)
        -> ExtractSummary
    load_extract(out_dir) -> dict[str, pd.DataFrame]
    TABLES: dict[str, pyarrow.Schema]
    TABLE_NAMES: the five table names, without importing pyarrow

Names load lazily so ``qis-fhir extract --help`` does not import pyarrow.
"""

from __future__ import annotations

import importlib

__all__ = ["extract_export", "load_extract", "ExtractSummary", "TABLES", "TABLE_NAMES"]

# the tables in schema order; schema.TABLES is checked against it at import (for callers, such as the
# Dagster check specs, that need the names without loading pyarrow)
TABLE_NAMES = ("patients", "conditions", "medication_requests", "observations", "encounters")

_WHERE = {
    "extract_export": "qis_fhir.fhir.extract",
    "load_extract": "qis_fhir.fhir.extract",
    "ExtractSummary": "qis_fhir.fhir.summary",
    "TABLES": "qis_fhir.fhir.schema",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
