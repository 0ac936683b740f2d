"""Dagster assets by stage group; each asset is a thin call of the ``qis_fhir`` library."""

from pipelines.assets.extract import fhir_extract
from pipelines.assets.mapping import mapping_set
from pipelines.assets.outcomes import outcome_events

ALL_ASSETS = [mapping_set, fhir_extract, outcome_events]

__all__ = ["ALL_ASSETS", "fhir_extract", "mapping_set", "outcome_events"]
