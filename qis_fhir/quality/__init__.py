"""Quality stage: great-expectations suites, declared as data in ``mappings/<version>/quality.yaml``.

``check_tables`` validates tables in memory; ``check_extract_tables`` and ``check_parquet_tables``
validate a run's tables from their files in batches, in worker processes (``workers.py``), as the
run does for the extract and the outcome events; a failed suite stops the run
(``QualityReport.raise_for_failure`` raises ``QualityError``) before anything could be published.
great_expectations is imported only when a check actually runs (the import costs 3-4 s).
"""

from qis_fhir.quality.checks import check_extract_tables, check_parquet_tables, check_table, check_tables
from qis_fhir.quality.report import ExpectationResult, QualityReport, SuiteResult
from qis_fhir.quality.suites import Rule, SuiteSet, load_suites, parse_suites

__all__ = [
    "ExpectationResult",
    "QualityReport",
    "Rule",
    "SuiteResult",
    "SuiteSet",
    "check_extract_tables",
    "check_parquet_tables",
    "check_table",
    "check_tables",
    "load_suites",
    "parse_suites",
]
