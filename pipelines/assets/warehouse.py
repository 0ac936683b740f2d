"""The site's outcome events and the pooled evidence as database tables, partitioned by day.

Two small assets downstream of the ones that write the run folder: each reads its checked table
(``qis_fhir.stages.table_step``) and returns it with the partition's day, and the ``warehouse`` IO
manager (``pipelines/warehouse.py``) stores it. The run folder stays the record the stages build on;
the database is a copy for analysts and dashboards, so lineage shows where each table comes from.
"""

import pandas as pd
from dagster import AssetExecutionContext, asset

from pipelines.assets.metadata import asset_info
from pipelines.assets.network import evidence_tables
from pipelines.assets.outcomes import outcome_events
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig
from pipelines.warehouse import PARTITION_COLUMN, WAREHOUSE


def _partition_table(context: AssetExecutionContext, site: SiteConfig, table: str) -> pd.DataFrame:
    from qis_fhir.stages import table_step

    frame = table_step(site.out_path(context.partition_key), table)
    return frame.assign(**{PARTITION_COLUMN: pd.Timestamp(context.partition_key)})


_COMMON = dict(
    partitions_def=daily_exports,
    group_name="warehouse",
    kinds={"pandas", "sql"},
    io_manager_key=WAREHOUSE,
    metadata={"partition_expr": PARTITION_COLUMN},
)


@asset(deps=[outcome_events], description=(
    "outcome_events.parquet of the partition (checked) as the database table <schema>.outcome_events_table, one "
    "row per event, with partition_date; pseudonymous patient keys, site-internal (docs/privacy.md)."), **_COMMON,
    **asset_info("warehouse", phi=True, uses_mapping=False))
def outcome_events_table(context: AssetExecutionContext, site: SiteConfig) -> pd.DataFrame:
    return _partition_table(context, site, "outcome_events")


@asset(deps=[evidence_tables], description=(
    "evidence/pooled_outcomes.parquet of the partition as the database table <schema>.pooled_outcomes_table: "
    "the network's pooled cells with this site's own figures beside them, with partition_date."), **_COMMON,
    **asset_info("warehouse", phi=False, uses_mapping=False))
def pooled_outcomes_table(context: AssetExecutionContext, site: SiteConfig) -> pd.DataFrame:
    return _partition_table(context, site, "pooled_outcomes")
