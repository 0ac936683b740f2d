"""This site's secure-aggregation rounds, advanced each night by what is due (docs/secagg.md).

One partitioned asset in the nightly job, ``secure_rounds``: after the partition's packets (a cell
the site publishes in the clear stays out of every masked sum, and which ones it publishes is known
only then) and before the evidence (which pools the secure totals the rounds released). It calls one
step, ``qis_fhir.stages.secagg_step``, which ``qis-fhir secagg rounds --run`` calls too. A round runs
over two weeks of windows from the day its period closed, so most nights post one message per round
under way, or nothing; a round this site missed is counted, not a failure. The DHT not answering
fails under the publish asset's retry policy.

The single steps of a round named by a round file (``qis-fhir secagg run|contribute|reveal|unmask``)
stay command-line tools: an operator's repair of one round, not a nightly asset.
"""

import time
from collections.abc import Callable

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, RetryPolicy, asset

from pipelines.assets.network import PUBLISH_RETRY, after_packets, dht_failure
from pipelines.resources import DhtConfig, SiteConfig


def rounds_asset(retry_policy: RetryPolicy = PUBLISH_RETRY, clock: Callable[[], float] = time.time) -> AssetsDefinition:
    """``secure_rounds`` under ``retry_policy`` on ``clock`` (tests pass a simulated one, as the DHT nodes they start run on)."""

    @asset(**after_packets("secure_rounds", retry_policy, uses_mapping=True, description=(
        "This site's secure-aggregation rounds under way (one presence and one value round per measure and "
        "period, from the day the period closed), advanced by tonight's step from the partition's outcome "
        "tables; released secure totals go to the site's ledger (SITE_DIR/secagg_released/), which the "
        "evidence pools. Cells published in the clear stay out of every masked sum.")))
    def secure_rounds(context: AssetExecutionContext, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
        from qis_fhir.stages import secagg_step

        result = dht_failure(lambda: secagg_step(site.out_path(context.partition_key), site.setup(), dht.addresses(), dht.bind, clock=clock))
        counts = result.counts
        return MaterializeResult(
            metadata={
                "rounds_due": counts["pairs_due"],
                "steps": MetadataValue.json(counts["steps"]),  # "presence:advertise": 2, "value:nothing due": 1, ...
                "rounds_missed": counts["missed"],
                "rounds_aborted": counts["aborted"],
                "rounds_released": counts["rounds_released"],
                "cells_released": counts["cells_released"],
            },
        )

    return secure_rounds


secure_rounds = rounds_asset()
