"""The shipped suites accept what the real extract and outcome stages make of the Synthea fixtures."""

from __future__ import annotations

import pytest

from qis_fhir.quality import check_tables


@pytest.mark.parametrize("fixture", ["synthea-r4-105", "synthea-bulk-10", "synthea-bundles"])
def test_real_stage_outputs_pass_every_suite(fixture, fixtures_dir, tmp_path, mapping):
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    extract_export(fixtures_dir / fixture, tmp_path, secret=b"s" * 32, validate="off")
    tables = load_extract(tmp_path)
    tables["outcome_events"] = derive_outcome_events(tables, mapping).events
    report = check_tables(tables, mapping)
    assert report.success, report.format()
    assert report.unchecked_tables == []
    if fixture == "synthea-r4-105":
        assert report.suite("observations").rows > 10_000
        assert report.suite("outcome_events").rows > 0


def test_real_events_with_a_tampered_value_fail(fixtures_dir, tmp_path, mapping):
    """The change rule catches an event whose change no longer equals follow-up minus baseline."""
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.outcomes import derive_outcome_events

    extract_export(fixtures_dir / "synthea-r4-105", tmp_path, secret=b"s" * 32, validate="off")
    events = derive_outcome_events(load_extract(tmp_path), mapping).events.copy()
    events.loc[0, "followup_value"] += 5.0
    report = check_tables({"outcome_events": events}, mapping)
    (failure,) = report.suite("outcome_events").failures
    assert failure.rule.name == "expression_between" and failure.unexpected_count == 1
