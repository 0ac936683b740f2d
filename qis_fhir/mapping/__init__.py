"""Mapping stage: versioned YAML that turns source codes into buckets, treatments and measures.

``load_mapping(path)`` reads ``mappings/<version>/``; see ``docs/mappings.md`` for the format.
"""

from qis_fhir.mapping.loader import DEFAULT_MAPPING_DIR, content_hash, load_mapping
from qis_fhir.mapping.model import (
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    UNKNOWN,
    AgeBand,
    CohortSpec,
    ConditionBucket,
    ControlMeasure,
    ControlReading,
    MappingSet,
    OutcomeMeasure,
    Treatment,
    match_code,
)

__all__ = [
    "DEFAULT_MAPPING_DIR",
    "ICD10CM",
    "LOINC",
    "RXNORM",
    "SNOMED",
    "UNKNOWN",
    "AgeBand",
    "CohortSpec",
    "ConditionBucket",
    "ControlMeasure",
    "ControlReading",
    "MappingSet",
    "OutcomeMeasure",
    "Treatment",
    "content_hash",
    "load_mapping",
    "match_code",
]
