"""The partition's packets on the DHT, and the network's pooled evidence seen from this site."""

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Backoff,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from pipelines.assets.metadata import asset_info, column_schema, pooled_preview
from pipelines.assets.packets import outcome_packets
from pipelines.partitions import daily_exports
from pipelines.resources import DhtConfig, SiteConfig
from qis_fhir.errors import ExitCode, QisError

#: a node restarting or a network blip heals within minutes: 1, 2 then 4 minutes (with jitter) before
#: the run fails; the signed packets stay in the partition folder, and a re-run sends the same ones
PUBLISH_RETRY = RetryPolicy(max_retries=3, delay=60, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
#: the failures another attempt can cure (no peer answered, a replica missing, another run writing
#: the folder); a refused key, a bad manifest or a missing setting fails at once, without retries
RETRIED = {ExitCode.NO_PEERS, ExitCode.PUBLISH_INCOMPLETE, ExitCode.RUN_INCOMPLETE}


def dht_failure(call):
    """``call()``, its ``QisError`` retried under the asset's policy when another attempt can cure it
    (``RETRIED``), else failed at once with the library's message."""
    try:
        return call()
    except QisError as exc:
        if exc.exit_code in RETRIED:
            raise
        raise Failure(description=str(exc), allow_retries=False) from exc


def after_packets(name: str, retry_policy: RetryPolicy, *, uses_mapping: bool, description: str) -> dict:
    """The ``@asset`` arguments of an asset that takes the partition's packets to the DHT: the
    network group, partitioned, retried under ``retry_policy`` (``published_packets``, ``secure_rounds``)."""
    return dict(name=name, partitions_def=daily_exports, group_name="network", kinds={"dht"},
                **asset_info("network", phi=False, uses_mapping=uses_mapping), deps=[outcome_packets], retry_policy=retry_policy,
                description=description)


def publish_asset(retry_policy: RetryPolicy = PUBLISH_RETRY) -> AssetsDefinition:
    """``published_packets`` under ``retry_policy`` (tests pass one without the minutes of waiting)."""

    @asset(**after_packets("published_packets", retry_policy, uses_mapping=False, description=(
        "The partition's packets stored on the DHT; publish_report.json says how many replicas confirmed "
        "each. Fails (and is retried) unless every packet was confirmed by at least one replica.")))
    def published_packets(context: AssetExecutionContext, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
        from qis_fhir.stages import PUBLISH_REPORT, publish_step

        out_dir = site.out_path(context.partition_key)
        summary = dht_failure(lambda: publish_step(out_dir, site.setup(), dht.addresses(), dht.bind)).to_dict()
        return MaterializeResult(
            metadata={
                "dagster/row_count": summary["packets"],
                "packets_published": summary["confirmed"],
                "replicas_min": summary["min_replicas"],
                "replicas_histogram": MetadataValue.json(summary["replicas_histogram"]),
                "nodes_contacted": summary["nodes_contacted"],
                "seconds": summary["elapsed_s"],
                "publish_report": MetadataValue.path(str(out_dir / PUBLISH_REPORT)),
            },
        )

    return published_packets


published_packets = publish_asset()


@asset(
    partitions_def=daily_exports,
    group_name="network",
    kinds={"parquet", "html"},
    **asset_info("network", phi=False, uses_mapping=False),
    deps=["published_packets", "secure_rounds"],
    description=(
        "The network's packets for every cohort and the secure totals this site's rounds released, verified and pooled (evidence/pooled_outcomes.parquet and "
        ".csv, site_estimates.parquet, provenance.json) with this site's own figures beside them, and the "
        "clinician report evidence/report.html."
    ),
)
def evidence_tables(context: AssetExecutionContext, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
    import pandas as pd
    import pyarrow.parquet as pq

    from qis_fhir.stages import evidence_step

    out_dir = site.out_path(context.partition_key)
    result = evidence_step(out_dir, site.setup(), dht.addresses(), dht.bind, run_date=context.partition_key)
    prov = result.provenance
    pooled_path = result.paths["pooled_outcomes"]
    return MaterializeResult(
        metadata={
            "dagster/row_count": prov["cells"],
            "packets_used": prov["packets_used"],
            "packets_rejected": MetadataValue.json(prov["packets_rejected"]),
            "sites": len(prov["sites"]),
            "dagster/column_schema": column_schema(pq.read_schema(pooled_path)),
            "preview": pooled_preview(pd.read_parquet(pooled_path)),
            "pooled_table": MetadataValue.path(str(result.paths["pooled_outcomes_csv"])),
            **({"report": MetadataValue.path(str(result.paths["report"]))} if "report" in result.paths else {}),
        },
    )
