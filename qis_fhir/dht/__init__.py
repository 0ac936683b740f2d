"""dht stage of qis-fhir."""
