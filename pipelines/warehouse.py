"""The site's database: where the outcome events and the pooled evidence land as SQL tables.

The two warehouse assets (``pipelines/assets/warehouse.py``) return DataFrames and the IO manager under
the resource key ``warehouse`` writes them, one daily partition at a time: it deletes the partition's
rows (``partition_date`` in that day) and inserts the new ones, so a re-run replaces and never
duplicates. The default is an embedded DuckDB file, ``<out_root>/warehouse.duckdb``, schema
``qis_fhir``; a hospital points the same assets at Postgres or its warehouse by binding another IO
manager to ``warehouse`` (docs/dagster.md), nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster_duckdb_pandas import DuckDBPandasIOManager

from pipelines.resources import SiteConfig

#: the resource key the warehouse assets write through; swap the IO manager bound to it, not the assets
WAREHOUSE = "warehouse"
SCHEMA = "qis_fhir"
DATABASE_FILE = "warehouse.duckdb"
#: the column each warehouse table carries the partition's day in (a TIMESTAMP at 00:00 of that day),
#: which the IO manager's ``partition_expr`` selects to replace one day's rows
PARTITION_COLUMN = "partition_date"


def duckdb_warehouse(out_root: str | Path) -> DuckDBPandasIOManager:
    """The embedded default: one DuckDB file beside the site's partition folders."""
    return DuckDBPandasIOManager(database=str(Path(out_root) / DATABASE_FILE), schema=SCHEMA)


def warehouse_from_env(environ: dict[str, str] | None = None) -> DuckDBPandasIOManager:
    """``duckdb_warehouse`` under ``QIS_OUT_ROOT`` (or ``SiteConfig``'s default), the root the site's outputs
    go to; read when the code location loads (the file's path is not a secret to defer)."""
    env = os.environ if environ is None else environ
    return duckdb_warehouse(env.get("QIS_OUT_ROOT") or SiteConfig.model_fields["out_root"].default)
