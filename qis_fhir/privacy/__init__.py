"""privacy stage of qis-fhir."""
