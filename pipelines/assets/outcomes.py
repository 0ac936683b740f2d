"""Treatment-outcome events of one partition, from its extract tables and the mapping set."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from pipelines.assets.extract import TABLE_ASSETS
from pipelines.assets.mapping import mapping_set
from pipelines.assets.metadata import asset_info, column_schema
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig


@asset(
    partitions_def=daily_exports,
    group_name="outcomes",
    kinds={"parquet"},
    **asset_info("outcomes", phi=True, uses_mapping=True),
    deps=[*TABLE_ASSETS, mapping_set],
    description=(
        "One row per treatment episode with a baseline and a follow-up value (outcome_events.parquet); "
        "outcome_summary.json counts events by bucket and treatment and every other episode by reason."
    ),
)
def outcome_events(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
    import pyarrow.parquet as pq

    from qis_fhir.outcomes.events import OUTCOME_EVENTS
    from qis_fhir.runfolder import OUTCOMES
    from qis_fhir.stages import amend_stage, outcomes_step, quality_report_path, quality_step

    out_dir = site.out_path(context.partition_key)
    mapping = site.setup().mapping
    # the partition's run folder gains the outcomes stage; until it is marked again no reader takes
    # the events (or anything derived from them) for finished
    with amend_stage(out_dir, OUTCOMES) as run:
        summary = outcomes_step(run, mapping)
        quality_step(run, mapping, "outcome_events")  # its verdict is the outcome_events_quality check's

    totals = summary["totals"]
    return MaterializeResult(
        metadata={
            "dagster/row_count": totals["events"],
            "dagster/column_schema": column_schema(pq.read_schema(out_dir / OUTCOME_EVENTS)),
            "events": totals["events"],
            "episodes": totals["episodes"],
            "responded": totals["responded"],
            "excluded": totals["excluded"],
            "exclusion_reasons": MetadataValue.json(summary["exclusion_reasons"]),
            "mapping_version": mapping.version,
            "mapping_hash": mapping.content_hash,
            "events_file": MetadataValue.path(str(out_dir / OUTCOME_EVENTS)),
            "quality_report": MetadataValue.path(str(quality_report_path(out_dir, "outcome_events"))),
        },
    )
