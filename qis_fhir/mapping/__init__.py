"""mapping stage of qis-fhir."""
