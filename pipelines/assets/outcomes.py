"""Treatment-outcome events of one partition, from its extract tables and the mapping set."""

import json

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from pipelines.assets.checks import quality_check_results, quality_check_specs, quality_report_path
from pipelines.assets.extract import fhir_extract
from pipelines.assets.mapping import mapping_set
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig


@asset(
    partitions_def=daily_exports,
    group_name="outcomes",
    kinds={"parquet"},
    deps=[fhir_extract, mapping_set],
    check_specs=quality_check_specs("outcome_events", ("outcome_events",)),
    description=(
        "One row per treatment episode with a baseline and a follow-up value (outcome_events.parquet); "
        "outcome_summary.json counts events by bucket and treatment and every other episode by reason."
    ),
)
def outcome_events(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
    from qis_fhir.fhir import load_extract
    from qis_fhir.outcomes import derive_outcome_events
    from qis_fhir.quality import check_tables
    from qis_fhir.runfolder import EXTRACT, OUTCOMES, QUALITY, amend_run

    out_dir = site.out_path(context.partition_key)
    mapping = site.load_mapping()
    # the partition's run folder gains the outcomes stage; until it is marked again no reader takes
    # the events for finished (a crash here leaves them unmarked, never mixed with earlier ones)
    with amend_run(out_dir, needs=(EXTRACT,), clears=(OUTCOMES, QUALITY)) as run:
        result = derive_outcome_events(load_extract(out_dir), mapping)
        report = check_tables({"outcome_events": result.events}, mapping)
        report.write(quality_report_path(out_dir, "outcome_events"))
        events_path, _ = result.write(out_dir)
        run.mark(OUTCOMES, result.summary["totals"])
        # "quality" means every suite passed, the extract's too (it may have been materialised in another run)
        extract_report = json.loads(quality_report_path(out_dir, "extract").read_text())
        if report.success and extract_report["success"]:
            run.mark(QUALITY, {"success": True})

    totals = result.summary["totals"]
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(result.events),
            "events": len(result.events),
            "episodes": totals["episodes"],
            "responded": totals["responded"],
            "excluded": totals["excluded"],
            "exclusion_reasons": MetadataValue.json(result.summary["exclusion_reasons"]),
            "mapping_version": mapping.version,
            "mapping_hash": mapping.content_hash,
            "events_file": MetadataValue.path(str(events_path)),
        },
        check_results=quality_check_results(report),
    )
