"""Dagster assets by stage group; each asset is a thin call of a ``qis_fhir.stages`` step."""

from pipelines.assets.checks import QUALITY_CHECKS
from pipelines.assets.export import fhir_export
from pipelines.assets.extract import fhir_extract
from pipelines.assets.mapping import mapping_set
from pipelines.assets.network import evidence_tables, published_packets
from pipelines.assets.outcomes import outcome_events
from pipelines.assets.packets import outcome_packets
from pipelines.assets.secagg import secure_rounds
from pipelines.assets.warehouse import outcome_events_table, pooled_outcomes_table

ALL_ASSETS = [fhir_export, mapping_set, fhir_extract, outcome_events, outcome_packets, published_packets, secure_rounds, evidence_tables,
              outcome_events_table, pooled_outcomes_table]

#: the asset checks defined on their own (the extract tables' line-count checks are part of their multi-asset)
ALL_CHECKS = [*QUALITY_CHECKS]

__all__ = ["ALL_ASSETS", "ALL_CHECKS", "evidence_tables", "fhir_export", "fhir_extract", "mapping_set", "outcome_events", "outcome_events_table", "outcome_packets",
           "pooled_outcomes_table", "published_packets", "secure_rounds"]
