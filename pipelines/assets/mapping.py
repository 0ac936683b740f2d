"""The mapping set a partition's events were derived with: version and content hash in the UI."""


from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from pipelines.assets.metadata import asset_info
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig


@asset(
    partitions_def=daily_exports,
    group_name="mapping",
    kinds={"yaml"},
    **asset_info("mapping", phi=False, uses_mapping=True),
    description=(
        "The versioned mapping set (condition buckets, treatment codes, outcome measures, cohorts, "
        "quality suites) loaded and schema-checked; its content hash is recorded by every event."
    ),
)
def mapping_set(context: AssetExecutionContext, site: SiteConfig) -> MaterializeResult:
    mapping = site.load_mapping()
    return MaterializeResult(
        metadata={
            "version": mapping.version,
            "content_hash": mapping.content_hash,
            "path": MetadataValue.path(str(mapping.path)),
            "buckets": len(mapping.buckets),
            "treatments": len(mapping.treatments),
            "measures": len(mapping.measures),
        },
        data_version=DataVersion(mapping.content_hash),
    )
