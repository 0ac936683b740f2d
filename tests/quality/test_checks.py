"""The shipped suites (mappings/v1/quality.yaml) on good and deliberately broken tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from quality_tables import key, ts

from qis_fhir.errors import ExitCode, MappingError, QualityError
from qis_fhir.quality import check_table, check_tables

SECRET = "Patient/mrn-0042-SECRET"  # a raw id that must never show up in a report


def test_good_tables_pass(tables, mapping):
    report = check_tables(tables, mapping)
    assert report.success, report.format()
    assert [s.table for s in report.results] == list(tables)
    assert all(len(s.results) > 5 for s in report.results)
    assert report.unchecked_tables == []
    report.raise_for_failure()  # does not raise


def test_empty_tables_pass(tables, mapping):
    """An export with no observations (like synthea-bulk-10) is not a quality failure."""
    empty = {name: df.iloc[0:0] for name, df in tables.items()}
    assert check_tables(empty, mapping).success


def _set(table, column, row, value):
    def mutate(tables):
        df = tables[table].copy()
        if isinstance(value, str):
            df[column] = df[column].astype(object)
        df.loc[row, column] = value
        tables[table] = df

    return mutate


def _dup(table, column):
    def mutate(tables):
        df = tables[table].copy()
        df.loc[1, column] = df.loc[0, column]
        tables[table] = df

    return mutate


def _drop(table, column):
    def mutate(tables):
        tables[table] = tables[table].drop(columns=[column])

    return mutate


def _astype(table, column, dtype):
    def mutate(tables):
        tables[table] = tables[table].assign(**{column: tables[table][column].astype(dtype)})

    return mutate


FUTURE = ts("2999-01-01")

BROKEN = {
    # id: (mutation, table, expectation, column, observed text)
    "raw_patient_id": (_set("patients", "patient_key", 0, SECRET), "patients", "matches_regex", "patient_key", "1 of 2 rows"),
    "duplicate_patient": (_dup("patients", "patient_key"), "patients", "unique", "patient_key", "rows unexpected"),
    "sex_not_fhir": (_set("patients", "sex", 1, "M"), "patients", "in_set", "sex", "1 of 2 rows"),
    "born_in_future": (_set("patients", "birth_date", 0, FUTURE), "patients", "not_in_future", "birth_date", "1 of 2 rows unexpected (100% of 1 non-null)"),
    "onset_missing": (_set("conditions", "onset", 2, pd.NaT), "conditions", "not_null", "onset", "1 of 3 rows"),
    "column_dropped": (_drop("conditions", "clinical_status"), "conditions", "columns_exist", "clinical_status", "column missing"),
    "request_status": (_set("medication_requests", "status", 0, "bogus"), "medication_requests", "in_set", "status", "1 of 2"),
    "request_key_raw": (_set("medication_requests", "request_key", 1, SECRET), "medication_requests", "matches_regex", "request_key", "1 of 2"),
    "sbp_wrong_unit": (_set("observations", "unit", 0, "kg"), "observations", "in_set", "unit", "1 of 2 rows"),
    "sbp_out_of_range": (_set("observations", "value", 0, 1400.0), "observations", "plausible_range", "value", "1 of 1 rows"),
    "value_not_float": (_astype("observations", "value", "str"), "observations", "of_type", "value", "dtype"),
    "observed_in_future": (_set("observations", "effective", 3, FUTURE), "observations", "not_in_future", "effective", "1 of 4"),
    "visit_status": (_set("encounters", "status", 0, "done"), "encounters", "in_set", "status", "1 of 3"),
    "visit_without_class": (_set("encounters", "class_code", 2, None), "encounters", "not_null", "class_code", "1 of 3"),
    "visit_in_future": (_set("encounters", "period_start", 1, FUTURE), "encounters", "not_in_future", "period_start", "1 of 3"),
    "responded_not_bool": (_astype("outcome_events", "responded", "int64"), "outcome_events", "of_type", "responded", "dtype int64"),
    "change_inconsistent": (_set("outcome_events", "change", 1, -3.0), "outcome_events", "expression_between", "change", "1 of 2 rows"),
    "stale_mapping_version": (_set("outcome_events", "mapping_version", 0, "v0"), "outcome_events", "equals", "mapping_version", "1 of 2"),
    "duplicate_event": (_dup("outcome_events", "event_id"), "outcome_events", "unique", "event_id", "rows unexpected"),
    "exact_date_period": (_set("outcome_events", "start_period", 0, "2015-02-01"), "outcome_events", "matches_regex", "start_period", "1 of 2"),
    "unknown_bucket": (_set("outcome_events", "bucket", 0, "not_a_bucket"), "outcome_events", "in_set", "bucket", "1 of 2"),
    "events_key_raw": (_set("outcome_events", "patient_key", 1, SECRET), "outcome_events", "matches_regex", "patient_key", "1 of 2"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_table_fails_naming_table_column_and_expectation(case, tables, mapping):
    mutate, table, expectation, column, observed = BROKEN[case]
    mutate(tables)
    report = check_tables({table: tables[table]}, mapping)  # one suite: GE costs ~0.3 s a suite
    assert not report.success
    failures = report.suite(table).failures
    assert any(f.rule.name == expectation and column in f.rule.columns for f in failures), report.format()
    text = report.format()
    assert f"table {table} " in text and column in text and expectation in text and observed in text
    assert "quality.yaml:" in text  # the rule's line, so the user can find it
    # never a cell value: neither in the readable report nor in the JSON written beside the outputs
    dumped = json.dumps(report.to_dict())
    assert SECRET not in text and SECRET not in dumped
    df = tables[table]
    for col in [c for c in df.columns if c.endswith("_key") or c == "event_id"]:
        for value in df[col].dropna().astype(str):
            assert value not in text and value not in dumped


def test_one_broken_table_fails_only_its_own_suite(tables, mapping):
    _set("observations", "unit", 0, "kg")(tables)
    report = check_tables(tables, mapping)
    assert [s.table for s in report.results if not s.success] == ["observations"]


def test_raise_for_failure_raises_quality_error_with_exit_code(tables, mapping):
    _set("observations", "unit", 0, "kg")(tables)
    report = check_tables(tables, mapping)
    with pytest.raises(QualityError) as info:
        report.raise_for_failure()
    assert info.value.exit_code == ExitCode.QUALITY_FAILED
    message = str(info.value)
    assert "FAILED" in message and "table observations" in message
    assert "in_set on unit" in message and "expected in {mm[Hg]}" in message
    assert len(message.splitlines()) >= 3  # one line per table plus the failure


def test_failure_counts_every_bad_row(tables, mapping):
    df = tables["observations"]
    df = pd.concat([df] * 50, ignore_index=True)  # 100 systolic rows
    df.loc[df.index[df["code"] == "8480-6"][:7], "value"] = 9.0
    result = check_table("observations", df, mapping)
    (bad,) = [r for r in result.failures if r.rule.name == "plausible_range"]
    assert (bad.unexpected_count, bad.element_count) == (7, 50)
    assert bad.unexpected_percent == pytest.approx(14.0)


def test_check_table_for_a_table_without_suite_is_a_mapping_error(tables, mapping):
    with pytest.raises(MappingError, match="no suite declared for table 'quarantine'"):
        check_table("quarantine", tables["patients"], mapping)


def test_tables_without_suite_are_listed_not_silently_passed(tables, mapping):
    report = check_tables({"patients": tables["patients"], "scratch": tables["patients"]}, mapping)
    assert report.success and report.unchecked_tables == ["scratch"]
    assert "no suite declared for: scratch" in report.format()


def test_to_dict_is_json_and_names_suites(tables, mapping):
    d = json.loads(json.dumps(check_tables(tables, mapping).to_dict()))
    assert d["success"] is True and d["mapping_version"] == mapping.version
    assert d["suites_file"] == "quality.yaml" and len(d["suites_sha256"]) == 64
    assert set(d["tables"]) == set(tables)
    assert d["tables"]["patients"]["failed"] == 0


def test_key_values_never_reported_even_when_all_rows_fail(tables, mapping):
    tables["patients"] = tables["patients"].assign(patient_key=[SECRET, SECRET + "2"], sex=["x", "y"])
    report = check_tables({"patients": tables["patients"]}, mapping)
    assert not report.success
    assert SECRET not in report.format() and SECRET not in json.dumps(report.to_dict())
    assert "2 of 2 rows unexpected" in report.format()


def test_a_key_that_merely_looks_hex_but_is_short_fails(tables, mapping):
    tables["patients"].loc[0, "patient_key"] = key("x")[:31]
    assert not check_table("patients", tables["patients"], mapping).success


def test_rule_that_cannot_be_evaluated_reports_error_class_only(tables, mapping):
    """A between rule on a text column makes pandas raise with the values in its message: never copied."""
    from qis_fhir.quality import parse_suites

    suites = parse_suites("schema: 1\ntables:\n  patients:\n    - between: {column: patient_key, min: 0}\n", mapping)
    tables["patients"].loc[0, "patient_key"] = SECRET
    result = check_table("patients", tables["patients"], mapping, suites=suites)
    (failure,) = result.failures
    assert failure.describe_observed().startswith("could not be evaluated (")
    assert SECRET not in result.format() and SECRET not in json.dumps(result.to_dict())
