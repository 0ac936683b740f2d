"""qis-fhir."""
