"""One site's nightly job, run in this process on a given instance: what the demo and the tests run.

The same job the schedule and the sensor launch (``daily_outcomes``), from the same Definitions
(:func:`pipelines.definitions.build_definitions`), with one site's resources bound instead of the
environment's. Several sites on one network run it in two parts: each site its own data up to the
published packets (and its events' database table), then, once every site has published, each
site's view of the network (``NETWORK_VIEW``), so every pooled table holds every site.
"""

from __future__ import annotations

from typing import Literal

from dagster import DagsterInstance, Definitions, ExecuteInProcessResult

from pipelines.definitions import build_definitions
from pipelines.jobs import NETWORK_VIEW, daily_outcomes_job
from pipelines.resources import DhtConfig, SiteConfig
from pipelines.warehouse import WAREHOUSE, duckdb_warehouse

SITE_TAG = "qis/site"  # the run tag naming the site a run was for (several sites share one instance)


def site_definitions(site: SiteConfig, dht: DhtConfig) -> Definitions:
    """The code location's Definitions bound to one site: its paths and keys, its DHT, its DuckDB file."""
    return build_definitions({"site": site, "dht": dht, WAREHOUSE: duckdb_warehouse(site.out_root)})


def run_nightly(defs: Definitions, partition: str, instance: DagsterInstance, *, part: Literal["all", "site", "network"] = "all",
                tags: dict[str, str] | None = None, log_level: str = "DEBUG") -> ExecuteInProcessResult:
    """``daily_outcomes`` for ``partition``: all of it, the site's own part, or the network view.

    Raises the step's own error (a ``QisError`` keeps its exit code) when a step fails. ``log_level``
    is the console's (every event is recorded in ``instance`` whatever it is)."""
    job = defs.resolve_job_def(daily_outcomes_job.name)
    selection = None
    if part != "all":
        selection = [k for k in job.asset_layer.selected_asset_keys if (k in NETWORK_VIEW) == (part == "network")]
    return job.execute_in_process(partition_key=partition, instance=instance, asset_selection=selection, tags=tags,
                                  run_config={"loggers": {"console": {"config": {"log_level": log_level}}}})
