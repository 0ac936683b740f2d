"""The suites over Parquet files in worker processes: the same report whatever the workers, the rounds
of workers and the part checked, and great-expectations never in the process that runs the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from quality_tables import without_times

from qis_fhir.errors import ExitCode, QualityError
from qis_fhir.fhir import extract_export, load_extract
from qis_fhir.fhir.scan import table_path
from qis_fhir.fhir.schema import TABLES
from qis_fhir.mapping import load_mapping
from qis_fhir.quality import check_tables, workers
from qis_fhir.quality.checks import check_extract_tables


@pytest.fixture(scope="module")
def small_groups(tmp_path_factory, fixtures_dir):
    """The fixture's extract with every table rewritten in row groups of 2,000 rows (one task each)."""
    out = tmp_path_factory.mktemp("extract")
    extract_export(fixtures_dir / "synthea-r4-105", out, secret=b"k" * 32)
    for name, schema in TABLES.items():
        path = table_path(out, name)
        pq.write_table(pq.read_table(path, schema=schema), path, row_group_size=2_000)
    return out


@pytest.mark.timeout(600)
def test_report_is_the_same_over_workers_and_rounds(small_groups, monkeypatch):
    """More tasks than one round of workers serves (workers retired after two tasks): each report, over
    one and over two workers, equals the one the whole tables give in one process. Retiring workers
    through ``max_tasks_per_child`` instead hangs this test on Python 3.11 (CPython gh-115634)."""
    mapping = load_mapping()
    tasks = sum(pq.ParquetFile(table_path(small_groups, t)).num_row_groups for t in TABLES)
    assert tasks > 2 * 2 * 2
    whole = without_times(check_tables(load_extract(small_groups), mapping).to_dict())
    assert whole["success"] is True
    monkeypatch.setattr(workers, "TASKS_PER_WORKER", 2)
    for n in (1, 2):
        report = check_extract_tables(small_groups, mapping, batch_rows=700, workers=n)
        assert without_times(report.to_dict()) == whole


def test_a_failing_task_fails_the_check(small_groups, tmp_path):
    """A table whose file is damaged after planning: the worker's error reaches the caller as the
    quality stage's error naming the table (no hang, no report built from the tasks that did run)."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(small_groups, out)
    path = table_path(out, "observations")
    tasks = workers.tasks_of("observations", path, 128, "fp", ())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(QualityError, match="the observations table's file observations.parquet cannot be read") as caught:
        workers.validate_all(tasks, 2)
    assert caught.value.exit_code == ExitCode.QUALITY_FAILED


def test_an_unreadable_table_is_a_quality_error_that_quotes_no_value(small_groups, tmp_path):
    """A column holding a value its type cannot take: Arrow's cast error quotes the value, the
    stage's error does not; and a file that is not Parquet at all fails before any worker starts."""
    import shutil

    out = tmp_path / "bad-value"
    shutil.copytree(small_groups, out)
    path = table_path(out, "patients")
    table = pq.read_table(path)
    column = table.schema.get_field_index("birth_date")
    secret_value = "not-a-date-7d1c"
    pq.write_table(table.set_column(column, "birth_date", pa.array([secret_value] * len(table))), path)
    with pytest.raises(QualityError, match="patients table") as caught:
        check_extract_tables(out, load_mapping())
    assert secret_value not in str(caught.value)
    path.write_bytes(b"not parquet")
    with pytest.raises(QualityError, match="patients table"):
        check_extract_tables(out, load_mapping())


def test_great_expectations_and_duckdb_stay_out_of_the_pipeline_process(small_groups, tmp_path):
    """The validation and the whole-file duplicate counts run in workers only, and the fork server they
    came from is gone when the check returns: neither the calling process nor anything it leaves
    running holds great-expectations (~250 MiB with its imports) or what DuckDB's aggregate kept
    beside the outcome stage that follows."""
    code = (
        "import json, sys, psutil\n"
        "from qis_fhir.mapping import load_mapping\n"
        "from qis_fhir.quality.checks import check_extract_tables\n"
        "if __name__ == '__main__':\n"
        f"    report = check_extract_tables({str(small_groups)!r}, load_mapping(), workers=2)\n"
        "    left = [' '.join(p.cmdline()) for p in psutil.Process().children(recursive=True)]\n"
        "    left = [c for c in left if 'resource_tracker' not in c]\n"
        "    print(json.dumps([report.success, 'great_expectations' in sys.modules, 'duckdb' in sys.modules, left]))\n"
    )
    script = tmp_path / "check.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, False, False, []]
