"""What every asset shows a data engineer: owners, tags, code version, column schemas, a table preview.

One place for each: the column schema is built from the pyarrow schema the library writes with
(``qis_fhir.fhir.schema.TABLES`` for the extract, the Parquet file's own schema for the derived
tables), so the UI can never list a column the file does not have.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import version

import pandas as pd
import pyarrow as pa
from dagster import MetadataValue, TableColumn, TableColumnConstraints, TableSchema

from qis_fhir.errors import QisError

log = logging.getLogger(__name__)

#: who answers for the assets in the UI (Dagster owners: ``team:`` names or e-mail addresses)
OWNERS = ["team:qis-fhir"]
PACKAGE_VERSION = version("qis-fhir")
#: the pooled table's preview: the largest cohorts first, this many rows
PREVIEW_ROWS = 10
_NOT_NULL = TableColumnConstraints(nullable=False)


def tags(stage: str, *, phi: bool) -> dict[str, str]:
    """``phi``: whether the asset's files hold pseudonymous patient-level rows (they never leave the site)."""
    return {"domain": "treatment-outcomes", "stage": stage, "patient_level": "true" if phi else "false"}


def _mapping_hash() -> str | None:
    """The content hash of the mapping set the code location is configured with (``QIS_MAPPING_DIR``,
    else the packaged default), read once at load; ``None`` when it does not load (the assets then
    fail with the mapping's own error, and the location still loads)."""
    from qis_fhir.mapping import load_mapping

    try:
        return load_mapping(os.environ.get("QIS_MAPPING_DIR") or None).content_hash
    except QisError as exc:
        log.warning("code version without a mapping hash: %s", exc)
        return None


_MAPPING_HASH = _mapping_hash()


def code_version(*, uses_mapping: bool) -> str:
    """The package version, plus the mapping's content hash for assets derived under it: a new
    release or a changed mapping marks them (and everything downstream) stale in the UI."""
    if uses_mapping and _MAPPING_HASH:
        return f"{PACKAGE_VERSION}+mapping.{_MAPPING_HASH[:12]}"
    return PACKAGE_VERSION


def column_schema(schema: pa.Schema) -> TableSchema:
    """``dagster/column_schema`` of a table written with ``schema``: names, Arrow types, nullability."""
    return TableSchema(
        columns=[TableColumn(name=f.name, type=_type_name(f.type), constraints=None if f.nullable else _NOT_NULL) for f in schema]
    )


def _type_name(t: pa.DataType) -> str:
    """Arrow's name of ``t``, with a list's item type only: Parquet renames the list's inner field
    (``list<item: string>`` is read back as ``list<element: string>``), the type is the same."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def pooled_preview(pooled: pd.DataFrame, rows: int = PREVIEW_ROWS) -> MetadataValue:
    """The pooled table's largest cohorts as Markdown: cohort, treatment, patients, sites, response
    (pooled share of responders with its interval). Pooled cells only: nothing below the network's
    minimum cell size is in the table."""
    from qis_fhir.evidence.report import age_label, fmt_pct, fmt_range, sex_label  # the clinician report's wording

    top = pooled.sort_values("patients", ascending=False, kind="stable").head(rows)
    lines = ["| cohort | treatment | patients | sites | response (95% CI) |", "| --- | --- | ---: | ---: | --- |"]
    for r in top.itertuples(index=False):
        cohort = f"{r.condition_display}, {sex_label(r.sex)}, {age_label(r.age_band)}"
        share, interval = fmt_pct(r.resp_pooled), fmt_range(r.resp_pooled_lo, r.resp_pooled_hi, fmt_pct)
        response = f"{share} ({interval})" if interval else share or "-"  # "-": a continuous measure without a share
        lines.append(f"| {cohort} | {r.treatment_display} | {r.patients} | {r.sites} | {response} |")
    return MetadataValue.md("\n".join(lines))


def asset_info(stage: str, *, phi: bool, uses_mapping: bool) -> dict:
    """The ``@asset`` arguments every asset sets the same way: owners, tags and code version."""
    return {"owners": OWNERS, "tags": tags(stage, phi=phi), "code_version": code_version(uses_mapping=uses_mapping)}
