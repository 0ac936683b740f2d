"""The extract suites read in batches give the report the whole tables give, failures and warnings included."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from quality_tables import without_times

from qis_fhir.fhir import extract_export, load_extract
from qis_fhir.fhir.scan import table_path
from qis_fhir.fhir.schema import TABLES
from qis_fhir.mapping import load_mapping
from qis_fhir.quality import check_tables
from qis_fhir.quality.checks import check_extract_tables


@pytest.fixture(scope="module")
def extract_dir(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("extract")
    extract_export(fixtures_dir / "synthea-r4-105", out, secret=b"k" * 32)
    return out


def _rewrite(out, table: str, change) -> None:
    path = table_path(out, table)
    pq.write_table(change(pq.read_table(path, schema=TABLES[table])), path, row_group_size=500)


def test_batches_report_what_whole_tables_report(extract_dir):
    mapping = load_mapping()
    whole = check_tables(load_extract(extract_dir), mapping).to_dict()
    batched = check_extract_tables(extract_dir, mapping, batch_rows=700).to_dict()
    assert whole["success"] is True
    assert without_times(batched) == without_times(whole)


def test_batches_find_duplicates_and_failures_that_span_batches(extract_dir, tmp_path):
    """A patient repeated at the far end of the table (another batch), a duplicated request, nulls and
    implausible values spread over batches: the combined counts and verdicts equal the whole table's."""
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(extract_dir, out)
    _rewrite(out, "patients", lambda t: pa.concat_tables([t, t.slice(0, 3)]))
    _rewrite(out, "medication_requests", lambda t: pa.concat_tables([t, t.slice(10, 1)]))
    # every 97th systolic value out of range (warnings or failures by share), every 1,000th status null
    def observations(t: pa.Table) -> pa.Table:
        n = len(t)
        idx = pa.array(range(n))
        value = pc.if_else(pc.equal(pc.bit_wise_and(idx, 63), 5), pa.scalar(900.0), t["value"])
        status = pc.if_else(pc.equal(pc.bit_wise_and(idx, 1023), 7), pa.scalar(None, pa.string()), t["status"])
        return t.set_column(t.schema.get_field_index("value"), "value", value).set_column(
            t.schema.get_field_index("status"), "status", status)

    _rewrite(out, "observations", observations)
    mapping = load_mapping()
    whole = check_tables(load_extract(out), mapping)
    batched = check_extract_tables(out, mapping, batch_rows=1_000)
    assert not whole.success
    failed = {(r.rule.table, r.rule.name) for s in whole.results for r in s.failures}
    assert {("patients", "unique"), ("medication_requests", "unique"), ("observations", "not_null")} <= failed
    assert without_times(batched.to_dict()) == without_times(whole.to_dict())
