"""fhir stage of qis-fhir."""
