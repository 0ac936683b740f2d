"""packets stage of qis-fhir."""
