"""The Dagster code location of qis-fhir (``[tool.dagster] module_name``): assembles, defines nothing.

Quality suites are partitioned, blocking ``@asset_check`` definitions of their own
(``pipelines/assets/checks.py``), so each can be executed alone for one partition.
:func:`build_definitions` is the one assembly: the code location binds the resources of the
environment it loads in, and the demo (``pipelines/demo.py``) and the tests bind one site's, so
what they run is what a hospital runs.
"""

from __future__ import annotations

from typing import Any

from dagster import Definitions, in_process_executor

from pipelines.assets import ALL_ASSETS, ALL_CHECKS
from pipelines.jobs import daily_outcomes_job
from pipelines.resources import RESOURCES
from pipelines.schedules import nightly_outcomes_schedule
from pipelines.sensors import new_export_sensor, run_failure_alert_sensor
from pipelines.warehouse import WAREHOUSE, warehouse_from_env


def build_definitions(resources: dict[str, Any]) -> Definitions:
    """Every asset, check, job, schedule and sensor, bound to ``resources`` (``site``, ``dht``, ``warehouse``)."""
    return Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[daily_outcomes_job],
        schedules=[nightly_outcomes_schedule],
        sensors=[new_export_sensor, run_failure_alert_sensor],
        resources=resources,
        # the default of every job without its own executor, the implicit all-assets job ("Materialize all"
        # in the UI) included: one process for one site's export, not one per step (16 s vs 3 s for two assets)
        executor=in_process_executor,
    )


defs = build_definitions({**RESOURCES, WAREHOUSE: warehouse_from_env()})
