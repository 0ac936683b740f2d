"""Outcomes stage: treatment episodes and treatment-outcome events (docs/outcomes.md)."""

from qis_fhir.outcomes.events import (
    EVENT_COLUMNS,
    EXCLUSION_REASONS,
    OUTCOME_EVENTS,
    OUTCOME_SUMMARY,
    OutcomeResult,
    derive_outcome_events,
)

__all__ = ["EVENT_COLUMNS", "EXCLUSION_REASONS", "OUTCOME_EVENTS", "OUTCOME_SUMMARY", "OutcomeResult", "derive_outcome_events"]
