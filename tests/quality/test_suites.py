"""quality.yaml parsing: the shipped suites load, and every kind of mistake names its file and line."""

from __future__ import annotations

import textwrap

import pytest
from quality_tables import good_tables

from qis_fhir.errors import ExitCode, MappingError
from qis_fhir.quality import check_tables, load_suites, parse_suites

TABLES = {"patients", "conditions", "medication_requests", "observations", "encounters", "outcome_events"}


def parse(text: str, mapping):
    return parse_suites(textwrap.dedent(text), mapping)


def test_shipped_suites_cover_every_table(mapping):
    suites = load_suites(mapping)
    assert set(suites.tables) == TABLES
    events = {r.name for r in suites.tables["outcome_events"]}
    assert {"unique", "of_type", "expression_between", "equals", "matches_regex"} <= events
    # $mapping references are resolved against the loaded mapping set
    (version_rule,) = [r for r in suites.tables["outcome_events"] if r.column == "mapping_version"and r.name == "equals"]
    assert version_rule.args["value"] == mapping.version
    (tx_rule,) = [r for r in suites.tables["outcome_events"] if r.name == "in_set" and r.column == "treatment_code"]
    assert set(tx_rule.args["values"]) == set(mapping.treatments)


def test_suites_are_part_of_the_mapping_hash(mapping):
    """quality.yaml sits in the mapping directory, so changing a rule changes the hash events record."""
    from qis_fhir.mapping.loader import content_hash

    assert (mapping.path / "quality.yaml").is_file()
    assert content_hash(mapping.path) == mapping.content_hash


def test_unknown_expectation_names_file_and_line(mapping):
    with pytest.raises(MappingError) as info:
        parse(
            """\
            schema: 1
            tables:
              patients:
                - not_null: patient_key
                - expect_magic: patient_key
            """,
            mapping,
        )
    assert str(info.value).startswith("quality.yaml:5: unknown expectation 'expect_magic'")
    assert info.value.exit_code == ExitCode.MAPPING_INVALID


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("- between: {column: value}", "needs min, max or both"),
        ("- between: {column: value, min: 5, max: 1}", "min 5 is greater than max 1"),
        ("- between: {column: value, min: low}", "min must be a number"),
        ("- in_set: {column: sex, values: []}", "values must be a non-empty list"),
        ("- in_set: {column: sex}", "missing argument(s): values"),
        ("- in_set: {column: sex, values: [a], colour: red}", "unknown argument(s): colour"),
        ("- matches_regex: {column: patient_key, regex: '(['}", "regex does not compile"),
        ("- of_type: {column: value, type: float64, where: {code: x}}", "of_type does not take 'where'"),
        ("- in_set: {column: sex, values: $mapping.nope}", "unknown reference '$mapping.nope'"),
        ("- expression_between: {expression: 'value.__class__', max: 1}", "expression may hold only"),
        ("- expression_between: {expression: 'exec(value)', max: 1}", "expression may hold only"),
        ("- not_null: 7", "expects a column name"),
        ("- not_null: a\n      unique: b", "one-key mapping"),
        ("- compound_unique: {columns: [a]}", "at least two columns"),
        ("- in_set: {column: unit, values: [x], where: {}}", "'where' must map column names"),
        ("- plausible_range: {column: value, min: 2, max: 25}", "missing argument(s): mostly"),
        ("- plausible_range: {column: value, max: 25, mostly: 1.5}", "mostly must be a fraction in (0, 1]"),
        ("- plausible_range: {column: value, max: 25, mostly: true}", "mostly must be a fraction in (0, 1]"),
    ],
)
def test_bad_entries_name_their_line(entry, message, mapping):
    text = "schema: 1\ntables:\n  observations:\n    - not_null: value\n  " + "  " + entry + "\n"
    with pytest.raises(MappingError) as info:
        parse_suites(text, mapping)
    assert str(info.value).startswith("quality.yaml:5: "), str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema: 1\ntables:\n  patients: [\n", "quality.yaml:4"),
        ("- a\n- b\n", "quality.yaml:1: expected a mapping"),
        ("schema: 2\ntables: {}\n", "'schema' must be 1"),
        ("schema: 1\ntables: {patients: []}\n", "needs a non-empty list"),
        ("schema: 1\ntables: {}\nsuites: {}\n", "unknown top-level key(s): suites"),
    ],
)
def test_bad_files(text, message, mapping):
    with pytest.raises(MappingError, match="quality.yaml") as info:
        parse_suites(text, mapping)
    assert message in str(info.value)


def test_missing_suites_file_is_a_mapping_error(mapping, tmp_path):
    with pytest.raises(MappingError, match="no quality suites for mapping v1"):
        load_suites(mapping, tmp_path / "quality.yaml")


def test_where_and_mostly_apply(mapping):
    """A rule with `where` only looks at matching rows; `mostly` tolerates a fraction of bad ones."""
    tables = good_tables(mapping)
    obs = tables["observations"]
    suites = parse(
        """\
        schema: 1
        tables:
          observations:
            - in_set: {column: unit, values: ["kg/m2"], where: {code: "39156-5"}}
            - plausible_range: {column: value, max: 200, mostly: 0.7}
            - between: {column: value, max: 200}
        """,
        mapping,
    )
    report = check_tables({"observations": obs}, mapping, suites=suites)
    ok = [r.success for r in report.suite("observations").results]
    assert ok == [True, True, False]  # 3 of 4 values <= 200: passes at 70 %, fails at 100 %
    assert report.suite("observations").results[0].element_count == 1


@pytest.mark.parametrize(
    "entry",
    [
        "- in_set: {column: unit, values: ['%'], where: {code: '4548-4'}, mostly: 0.99}",
        "- between: {column: source_line, min: 1, mostly: 0.99}",
        "- matches_regex: {column: patient_key, regex: '^[0-9a-f]{32}$', mostly: 0.99}",
        "- not_null: {column: patient_key, mostly: 0.99}",
        "- unique: {column: source_line, mostly: 0.99}",
        "- equals: {column: status, value: final, mostly: 0.99}",
        "- compound_unique: {columns: [patient_key, code], mostly: 0.99}",
        "- not_in_future: {column: effective, mostly: 0.99}",
        "- expression_between: {expression: 'value - value', min: 0, max: 0, mostly: 0.99}",
        "- of_type: {column: value, type: float64, mostly: 0.99}",
        "- row_count_between: {min: 1, mostly: 0.99}",
    ],
)
def test_mostly_on_a_structural_rule_is_refused_at_load(entry, mapping):
    """Ids, codes, units, types and counts block on one bad row: only plausibility may tolerate some."""
    text = "schema: 1\ntables:\n  observations:\n    - not_null: value\n    " + entry + "\n"
    name = entry[2 : entry.index(":")]
    with pytest.raises(MappingError) as info:
        parse_suites(text, mapping)
    assert str(info.value).startswith(f"quality.yaml:5: {name} takes no 'mostly': it checks structure")
    assert "only plausible_range" in str(info.value) and info.value.exit_code == ExitCode.MAPPING_INVALID


def test_changed_rules_take_effect_in_the_same_process(mapping):
    """Suites are cached per resolved content, so a new suite file is never served stale rules."""
    tables = good_tables(mapping)
    lax = parse("schema: 1\ntables:\n  patients:\n    - in_set: {column: sex, values: [female, male]}\n", mapping)
    strict = parse("schema: 1\ntables:\n  patients:\n    - in_set: {column: sex, values: [female]}\n", mapping)
    assert check_tables({"patients": tables["patients"]}, mapping, suites=lax).success
    assert not check_tables({"patients": tables["patients"]}, mapping, suites=strict).success
    assert check_tables({"patients": tables["patients"]}, mapping, suites=lax).success
