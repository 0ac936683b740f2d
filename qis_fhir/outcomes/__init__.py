"""outcomes stage of qis-fhir."""
