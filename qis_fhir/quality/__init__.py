"""quality stage of qis-fhir."""
