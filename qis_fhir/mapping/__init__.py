"""Mapping stage: versioned YAML that turns source codes into buckets, treatments and measures.

``load_mapping(path)`` reads ``mappings/<version>/``; see ``docs/mappings.md`` for the format.
"""

from qis_fhir.mapping.loader import (
    DEFAULT_MAPPING_DIR,
    DEFAULT_MAPPING_VERSION,
    MAPPINGS_ROOT,
    content_hash,
    load_mapping,
)
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
    "DEFAULT_MAPPING_VERSION",
    "ICD10CM",
    "LOINC",
    "MAPPINGS_ROOT",
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
