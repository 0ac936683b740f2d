"""Signed outcome packets of one partition, under disclosure control, with their disclosure report."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from pipelines.assets.metadata import asset_info
from pipelines.assets.outcomes import outcome_events
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig


@asset(
    partitions_def=daily_exports,
    group_name="packets",
    kinds={"ndjson"},
    **asset_info("packets", phi=False, uses_mapping=True),
    deps=[outcome_events],
    description=(
        "One signed packet per cell of at least the network's minimum cell size (packets.ndjson), seq = the "
        "partition date as YYYYMMDD x 100 + revision, nothing for a day older than the newest released one (the "
        "release policy, docs/packets.md); disclosure_report.json counts cells published, held unchanged and suppressed."
    ),
)
def outcome_packets(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
    from qis_fhir.packets.build import PACKETS_FILE
    from qis_fhir.packets.release import release_line
    from qis_fhir.runfolder import PACKETS
    from qis_fhir.stages import DISCLOSURE_REPORT, amend_stage, packets_step

    out_dir = site.out_path(context.partition_key)
    setup = site.setup()
    setup.require_site("signing packets")  # before the run folder is touched
    with amend_stage(out_dir, PACKETS) as run:
        built = packets_step(run, setup, context.partition_key)
    report = built.disclosure_report
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(built.packets),
            "cells_published": report["cells"]["published"],
            "cells_held": report["cells"]["held"],
            "cells_suppressed": report["cells"]["suppressed"],
            "cells_in_secure_total": report["cells"]["in_secure_total"],  # left to a secure total this site released
            "min_cell_size": report["min_cell_size"],
            "seq": report["seq"],
            "release": release_line(report["release"]),
            "disclosure_report": MetadataValue.json(report),
            "packets_file": MetadataValue.path(str(out_dir / PACKETS_FILE)),
            "disclosure_report_path": MetadataValue.path(str(out_dir / DISCLOSURE_REPORT)),
        },
    )
