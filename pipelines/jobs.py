"""The partitioned job the schedule and the sensor launch: every asset of one day's export, export to evidence."""

from __future__ import annotations

from dagster import AssetKey, AssetSelection, define_asset_job, in_process_executor

from pipelines.partitions import daily_exports

#: the assets that read the network's view rather than the site's own data: the pooled evidence and its
#: database table. A site's first night, or a demo of several sites, runs them once every site has published.
NETWORK_VIEW = (AssetKey("evidence_tables"), AssetKey("pooled_outcomes_table"))

#: in-process: measured 16 s with the multiprocess executor vs 3 s for two assets,
#: and one process keeps the great-expectations context (3-4 s to import) warm for every check.
daily_outcomes_job = define_asset_job(
    "daily_outcomes",
    selection=AssetSelection.groups("mapping", "extract", "outcomes", "packets", "network", "warehouse", include_sources=True),  # the export is observed first
    partitions_def=daily_exports,
    executor_def=in_process_executor,
    description="Extract one nightly export, check it, derive and check its treatment-outcome events, sign and publish "
    "their packets, pool the network's evidence, and store the events and the pooled table in the site's database.",
)
