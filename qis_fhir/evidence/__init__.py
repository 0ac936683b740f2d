"""Evidence: pool the network's outcome packets into tables and a report a clinician can read."""
