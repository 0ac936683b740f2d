"""The nightly export itself, as an observable source asset: what lies in the partition's folder.

Observed (not materialised: Dagster does not make it) at the start of every run of the partition and
from the UI's "Observe": files and bytes by resource type, whether the folder is complete by the rule
the new-export sensor waits for (``qis_fhir.exportstate``), whether a ``$export`` manifest lies beside
the data, and a data version that changes when any file does, so the UI marks the extracted tables
stale when a day's export is re-delivered.
"""

from datetime import UTC, datetime

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    DataVersion,
    MetadataValue,
    ObserveResult,
    multi_observable_source_asset,
)

from pipelines.assets.metadata import OWNERS, code_version, tags
from pipelines.partitions import daily_exports
from pipelines.resources import SiteConfig

EXPORT = "fhir_export"


@multi_observable_source_asset(
    specs=[AssetSpec(
        EXPORT,
        partitions_def=daily_exports,
        group_name="extract",
        kinds={"ndjson"},
        owners=OWNERS,
        tags=tags("export", phi=True),
        code_version=code_version(uses_mapping=False),
        description=(
            "The partition's FHIR bulk export folder (<export_root>/<YYYY-MM-DD>/), as the hospital's bulk-export "
            "client wrote it: files and bytes by resource type, completion, and a data version over names, sizes and times."
        ),
    )],
)
def fhir_export(context: AssetExecutionContext, site: SiteConfig) -> ObserveResult:
    from qis_fhir.exportstate import inspect_export

    folder = site.export_path(context.partition_key)
    state = inspect_export(folder)
    changed = None if state.newest_change is None else datetime.fromtimestamp(state.newest_change, UTC).isoformat(timespec="seconds")
    return ObserveResult(
        asset_key=EXPORT,
        metadata={
            "completion": state.completion,
            "files": state.files,
            "bytes": state.bytes,
            "files_by_type": MetadataValue.json(state.files_by_type),
            "bytes_by_type": MetadataValue.json(state.bytes_by_type),
            "newest_change": changed or "-",
            "bulk_manifest": state.bulk_manifest,
            "truncated": state.truncated,
            "path": MetadataValue.path(str(folder)),
        },
        data_version=DataVersion(state.version or state.completion),
    )
