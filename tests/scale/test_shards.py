"""However many patient shards and worker processes, a run gives what the whole-table stages gave.

``recorded.json`` holds the counts and digests of runs of the whole-table implementation
(``oracle.py``); here the same exports run with one shard in one process and with several shards
over two processes, and everything a user sees must be equal: the extract summary and quarantine,
outcome summary, events, control units, quality verdicts and counts, disclosure report.
"""

from __future__ import annotations

import json

import oracle
import pandas as pd
import pytest

RECORDED = json.loads(oracle.RECORDED.read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, fixtures_dir):
    return tmp_path_factory.mktemp("scale")


@pytest.mark.parametrize("shards,workers", [(1, 1), (5, 2)])
@pytest.mark.parametrize("key", sorted(RECORDED))
def test_a_run_gives_the_recorded_whole_table_results(tmp, key, shards, workers):
    name, mapping = key.split("/")
    export = oracle.exports(tmp)[name]
    got = oracle.run(export, tmp / f"run-{name}-{mapping}-{shards}", mapping, tmp, shards=shards, workers=workers)
    assert got == RECORDED[key]


def test_shards_give_the_whole_table_derivation_byte_for_byte(tmp):
    """Against the derivation on the whole tables in this very code (not only recorded digests):
    events and control units equal frame for frame, the summary key for key, with 1, 3 and 8 shards."""
    from qis_fhir.fhir import extract_export, load_extract
    from qis_fhir.mapping import load_mapping
    from qis_fhir.outcomes import derive_outcome_events
    from qis_fhir.outcomes.sharded import derive_outcomes_sharded

    out = tmp / "extract-v2"
    extract_export(oracle.exports(tmp)["synth"], out, secret=oracle.SECRET)
    mapping = load_mapping(oracle.REPO / "mappings" / "v2")
    whole = derive_outcome_events(load_extract(out), mapping)
    assert len(whole.events) > 100 and len(whole.units) > 100
    for shards, workers in ((1, 1), (3, 1), (8, 2)):
        sharded = derive_outcomes_sharded(out, mapping, shards=shards, workers=workers)
        pd.testing.assert_frame_equal(sharded.events, whole.events)
        pd.testing.assert_frame_equal(sharded.units, whole.units)
        assert sharded.summary == whole.summary
    assert not list(out.glob(".outcome-shards-*")) and not list(out.glob(".duckdb-*"))  # temporary folders removed


def test_the_outcome_stage_leaves_nothing_in_the_calling_process(tmp, tmp_path):
    """The staging pass, the shards and their combine run in worker processes, and none is left when
    the stage returns (the fork server they came from included): the caller never runs DuckDB (whose
    allocator keeps what a pass used), so the quality workers that follow start beside a process no
    larger than before the stage."""
    import subprocess
    import sys

    from qis_fhir.fhir import extract_export

    out = tmp / "extract-caller"
    extract_export(oracle.exports(tmp)["synth"], out, secret=oracle.SECRET)
    code = (
        "import json, sys, psutil\n"
        "from qis_fhir.mapping import load_mapping\n"
        "from qis_fhir.outcomes.sharded import derive_outcomes_sharded\n"
        "if __name__ == '__main__':\n"
        f"    result = derive_outcomes_sharded({str(out)!r}, load_mapping({str(oracle.REPO / 'mappings' / 'v2')!r}), shards=3)\n"
        "    left = [' '.join(p.cmdline()) for p in psutil.Process().children(recursive=True)]\n"
        "    left = [c for c in left if 'resource_tracker' not in c]  # multiprocessing's own helper\n"
        "    print(json.dumps([len(result.events) > 0, 'duckdb' in sys.modules, left]))\n"
    )
    script = tmp_path / "derive.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, False, []]
