"""The DuckDB connection every pass over the extract uses (``scan.connect``)."""

from __future__ import annotations

from qis_fhir.fhir.scan import connect


def test_a_pass_draws_no_progress_bar_and_leaves_no_spill_folder(tmp_path):
    """DuckDB draws a progress bar on stderr for a query over 2 s (the outcome staging pass takes 27 s
    at 20 million Observations): in a nightly run's log that is a screenful of control characters."""
    with connect(tmp_path) as con:
        assert con.execute("SELECT current_setting('enable_progress_bar')").fetchone() == (False,)
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0].startswith("244")  # 256 MB, in MiB
        spill = [p for p in tmp_path.iterdir() if p.name.startswith(".duckdb-")]
        assert len(spill) == 1
    assert not spill[0].exists()
