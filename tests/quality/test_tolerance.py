"""Plausibility ranges tolerate a few implausible values and report them; a larger share still blocks.

The input is the real extract of the Synthea r4 fixture (204 HbA1c rows, all between 5.4 and 7.6 %)
with values replaced the way a lab feed gets them wrong: one typo, a few, or a whole feed in mmol/mol.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from qis_fhir.errors import ExitCode, QualityError
from qis_fhir.quality import check_tables

HBA1C = "4548-4"


@pytest.fixture(scope="module")
def observations(fixtures_dir, tmp_path_factory) -> pd.DataFrame:
    from qis_fhir.fhir import extract_export, load_extract

    out = tmp_path_factory.mktemp("r4")
    extract_export(fixtures_dir / "synthea-r4-105", out, secret=b"s" * 32, validate="off")
    return load_extract(out)["observations"]


def _with_hba1c(observations: pd.DataFrame, values) -> pd.DataFrame:
    """``observations`` with its first HbA1c values replaced by ``values`` (a list, or a function)."""
    df = observations.copy()
    rows = df.index[df["code"] == HBA1C]
    if callable(values):
        df.loc[rows, "value"] = values(df.loc[rows, "value"])
    else:
        df.loc[rows[: len(values)], "value"] = values
    return df


def _hba1c_rule(report):
    (result,) = [
        r for r in report.suite("observations").results
        if r.rule.name == "plausible_range" and r.rule.where == {"code": (HBA1C,)}
    ]
    return result


def test_one_implausible_hba1c_among_many_valid_rows_passes_with_a_warning(observations, mapping):
    df = _with_hba1c(observations, [26.0])  # one HbA1c of 26 % (the possible range ends at 25)
    report = check_tables({"observations": df}, mapping)
    report.raise_for_failure()  # does not block the night
    hba1c = _hba1c_rule(report)
    assert hba1c.success and hba1c.warning
    assert (hba1c.unexpected_count, hba1c.element_count) == (1, 204)
    assert [w.rule for w in report.suite("observations").warnings] == [hba1c.rule]
    text = report.format()
    assert text.startswith("quality check passed with 1 warning: ")
    assert (
        f"  - warning: {hba1c.rule.source} plausible_range on value: observed 1 of 204 rows unexpected (0.49%); "
        f"expected between 2 and 25 for at least 99% of rows (where code == {HBA1C})"
    ) in text.splitlines()
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["success"] is True and doc["warnings"] == 1
    assert doc["tables"]["observations"]["warnings"] == 1
    assert "26.0" not in text and "26.0" not in json.dumps(doc)  # counts and the rule, never the value


def test_no_warning_when_every_value_is_plausible(observations, mapping):
    report = check_tables({"observations": observations}, mapping)
    assert report.success and report.warnings == 0
    assert not _hba1c_rule(report).warning and "warning" not in report.format()


@pytest.mark.parametrize(
    ("values", "observed"),
    [
        ([26.0, 0.5, 31.0], "3 of 204 rows unexpected (1.47%)"),  # more than 1 % of the HbA1c rows
        (lambda pct: (pct - 2.15) * 10.929, "204 of 204 rows unexpected (100%)"),  # the feed sent IFCC mmol/mol
    ],
    ids=["three_typos", "whole_feed_in_mmol_per_mol"],
)
def test_a_share_above_mostly_blocks(observations, mapping, values, observed):
    report = check_tables({"observations": _with_hba1c(observations, values)}, mapping)
    hba1c = _hba1c_rule(report)
    assert not hba1c.success and not hba1c.warning
    assert hba1c in report.suite("observations").failures
    with pytest.raises(QualityError) as info:
        report.raise_for_failure()
    assert info.value.exit_code == ExitCode.QUALITY_FAILED
    assert f"plausible_range on value: observed {observed}" in str(info.value)


def test_a_night_with_one_implausible_hba1c_publishes_and_reports_it(tmp_path):
    """The nightly run end to end: one HbA1c of 26 % in a synthetic export (of a patient with no
    treatment, so no outcome event reads it) no longer stops the run; its report carries the warning."""
    from qis_fhir.pipeline import RunConfig, run_pipeline
    from qis_fhir.stages import quality_report_path
    from qis_fhir.synth import generate_export

    export = tmp_path / "export"
    generate_export(export, patients=300, seed=5)
    treated = {json.loads(line)["subject"]["reference"] for line in (export / "MedicationRequest.000.ndjson").open()}
    path = export / "Observation.000.ndjson"
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        obs = json.loads(line)
        if obs["code"]["coding"][0]["code"] == HBA1C and obs["subject"]["reference"] not in treated:
            obs["valueQuantity"]["value"] = 26.0
            lines[i] = json.dumps(obs) + "\n"
            break
    else:
        raise AssertionError("the synthetic export has no HbA1c of an untreated patient")
    path.write_text("".join(lines))

    result = run_pipeline(RunConfig(export_dir=export, out_dir=tmp_path / "out", site_secret_path=tmp_path / "s"))
    assert result.quality["success"] is True and result.quality["warnings"] == 1
    assert result.outcomes["totals"]["events"] > 0
    report = json.loads(quality_report_path(tmp_path / "out", "extract").read_text())
    (warned,) = [r for r in report["tables"]["observations"]["results"] if r["warning"]]
    assert warned["expectation"] == "plausible_range" and warned["unexpected_count"] == 1
