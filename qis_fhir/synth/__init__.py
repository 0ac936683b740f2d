"""synth stage of qis-fhir."""
