"""bench stage of qis-fhir."""
