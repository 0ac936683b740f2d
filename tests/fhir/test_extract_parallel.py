"""Extraction over several processes writes what one process writes: tables row for row in the same
order, the same quarantine records in the same order, the same summary counts per file."""

from __future__ import annotations

import gzip
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from qis_fhir.errors import InputNotFoundError
from qis_fhir.fhir import TABLE_NAMES, extract_export
from qis_fhir.fhir.extract import plan_extraction
from qis_fhir.fhir.parallel import _part, finish_staged, stage_task, tasks
from qis_fhir.fhir.sources import Labeller, discover

SECRET = b"p" * 32


def _outputs(out):
    summary = (out / "extract" / "summary.json").read_text()
    import json

    summary = json.loads(summary)
    summary.pop("seconds")
    tables = {t: pq.read_table(out / "extract" / f"{t}.parquet").to_pandas() for t in TABLE_NAMES}
    return summary, tables, (out / "quarantine.ndjson").read_bytes()


def _assert_same(a, b):
    assert a[0] == b[0]
    for t in TABLE_NAMES:
        pd.testing.assert_frame_equal(a[1][t], b[1][t], check_dtype=True)
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory, fixtures_dir):
    """Bulk parts of several types (some gzipped, some damaged), a Bundle, a Medication file ahead of
    requests that name it, and an NDJSON file of mixed types: every route a file can take."""
    export = tmp_path_factory.mktemp("mixed")
    src = fixtures_dir / "synthea-r4-105"
    for path in sorted(src.iterdir()):
        shutil.copy(path, export / path.name)
    obs = (src / "Observation.000.ndjson").read_bytes().splitlines(keepends=True)
    half = len(obs) // 2
    (export / "Observation.000.ndjson").write_bytes(b"".join(obs[:half]))
    (export / "Observation.001.ndjson.gz").write_bytes(gzip.compress(b"".join(obs[half:]) + b"{not json\n\n"))
    (export / "Observation.002.ndjson.gz").write_bytes(gzip.compress(b"".join(obs[:50]))[:-20])  # truncated
    (export / "Medication.000.ndjson").write_bytes(
        b'{"resourceType":"Medication","id":"m1","code":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"314076"}]}}\n')
    bundles = sorted((fixtures_dir / "synthea-bundles").glob("*.json"))[:2]
    for b in bundles:
        shutil.copy(b, export / b.name)
    mixed = (src / "Patient.000.ndjson").read_bytes().splitlines(keepends=True)[:3] + obs[:5]
    (export / "mixed.ndjson").write_bytes(b"".join(mixed))
    return export


def test_files_are_split_into_independent_tasks_and_one_ordered_chain(mixed_export):
    sources, _ = discover(mixed_export, Labeller(SECRET))
    jobs = tasks(sources)
    chain = [t for t in jobs if len(t) > 1]
    assert len(chain) == 1 and chain[0] == sorted(chain[0])
    names = {sources[i].label for i in chain[0]}
    assert {"Medication.000.ndjson", "MedicationRequest.000.ndjson"} <= names
    assert sorted(i for t in jobs for i in t) == list(range(len(sources)))  # every file once


@pytest.mark.parametrize("export_name", ["mixed", "synthea-bulk-10"])
def test_parallel_extraction_writes_what_one_process_writes(tmp_path, mixed_export, fixtures_dir, export_name):
    export = mixed_export if export_name == "mixed" else fixtures_dir / export_name
    one = extract_export(export, tmp_path / "one", secret=SECRET, validate="sample", sample_rate=0.05)
    extract_export(export, tmp_path / "three", secret=SECRET, validate="sample", sample_rate=0.05, workers=3)
    assert one.totals["read"] > 3000 and one.validated > 0
    if export_name == "mixed":
        assert one.totals["quarantined"] > 90
        assert {"invalid_json", "corrupt_file"} <= set(one.quarantine_reasons)
    _assert_same(_outputs(tmp_path / "one"), _outputs(tmp_path / "three"))
    assert not list((tmp_path / "three").glob(".extract-parts-*"))  # the workers' outputs are removed


def test_tasks_staged_one_by_one_in_any_order_finish_as_one_process_writes(tmp_path, mixed_export):
    """What an orchestrator does with the tasks (each a step of its own, run wherever and whenever,
    ``pipelines/assets/extract.py``): the plan, each task into the staging folder, then the finish."""
    one = extract_export(mixed_export, tmp_path / "one", secret=SECRET, validate="sample", sample_rate=0.05)
    plan, _ = plan_extraction(mixed_export, secret=SECRET, validate="sample", sample_rate=0.05)
    staging = tmp_path / "staging"
    staging.mkdir()
    parts = [stage_task(plan, task, staging, SECRET) for task in reversed(plan.tasks)]  # the last planned first
    out = tmp_path / "staged"
    out.mkdir()
    summary = finish_staged(plan, staging, out, parts, seconds=1.0)
    assert summary.totals == one.totals and summary.rows == one.rows
    _assert_same(_outputs(tmp_path / "one"), _outputs(out))


def test_a_task_refuses_an_export_changed_since_it_was_planned(tmp_path, mixed_export):
    export = tmp_path / "export"
    shutil.copytree(mixed_export, export)
    plan, _ = plan_extraction(export, secret=SECRET)
    (export / "Condition.001.ndjson").write_bytes(b"")  # a part file arriving late: every later file moves
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(InputNotFoundError, match="changed while it was extracted"):
        stage_task(plan, plan.tasks[0], staging, SECRET)
    assert list(staging.iterdir()) == []


def test_a_task_that_fails_leaves_none_of_its_parts(tmp_path, mixed_export, monkeypatch):
    from qis_fhir.fhir.extract import _Extraction

    plan, _ = plan_extraction(mixed_export, secret=SECRET)
    chain = next(t for t in plan.tasks if len(t) > 2)
    run_file, calls = _Extraction.run_file, []

    def fails_on_the_third_file(self, src):
        calls.append(src.label)
        if len(calls) == 3:
            raise MemoryError
        return run_file(self, src)

    monkeypatch.setattr(_Extraction, "run_file", fails_on_the_third_file)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(MemoryError):
        stage_task(plan, chain, staging, SECRET)
    assert len(calls) == 3 and list(staging.iterdir()) == []  # the parts of the files begun were written, then removed


def test_staged_tasks_refuse_a_staging_folder_that_is_gone_or_short_of_a_part(tmp_path, mixed_export):
    """A staging folder removed once its run ended (another run of the partition cleaned it up) is not
    made again by a late task, and a merge short of a file's part says so before writing anything."""
    plan, _ = plan_extraction(mixed_export, secret=SECRET)
    gone = tmp_path / "gone"
    with pytest.raises(InputNotFoundError, match="is gone"):
        stage_task(plan, plan.tasks[0], gone, SECRET)
    assert not gone.exists()

    staging = tmp_path / "staging"
    staging.mkdir()
    parts = [stage_task(plan, task, staging, SECRET) for task in plan.tasks]
    shutil.rmtree(_part(staging, plan.tasks[-1][0]))
    out = tmp_path / "out"
    with pytest.raises(InputNotFoundError, match=f"1 of the {len(plan.labels)} files' parts are missing"):
        finish_staged(plan, staging, out, parts, seconds=1.0)
    assert not out.exists()
