"""Run folders: a new run replaces a complete one whole or not at all, and readers can tell.

The SIGKILL test of a real `qis-fhir run` is in tests/test_pipeline.py; these drive the swap, its
two-rename fallback, an interrupted swap and an amendment directly.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from qis_fhir import runfolder
from qis_fhir.errors import AlreadyExistsError, ExitCode, QualityError, RunIncompleteError
from qis_fhir.runfolder import amend_run, recover, require_run, start_run


def _complete_run(out, text: str) -> str:
    with start_run(out, command="test", planned=["extract"]) as run:
        (run.path / "table.txt").write_text(text)
        run.mark("extract", {"rows": 1})
    return run.run_id


def _no_exchange(monkeypatch):
    def refuse(a, b):
        raise OSError(errno.ENOSYS, "no exchange here")

    monkeypatch.setattr(runfolder, "exchange", refuse)


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b" / "f").write_text("b")
    runfolder.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "two-renames"])
def test_a_new_run_replaces_the_previous_one_whole(tmp_path, monkeypatch, atomic):
    if not atomic:
        _no_exchange(monkeypatch)
    out = tmp_path / "out"
    first = _complete_run(out, "first")
    with start_run(out, command="test", planned=["extract"]) as run:
        assert run.path == tmp_path / "out.partial"
        (run.path / "table.txt").write_text("second")
        # until the new run completes, the folder still holds the previous one, readable
        assert require_run(out, "extract")["run_id"] == first
        assert (out / "table.txt").read_text() == "first"
        run.mark("extract")
    assert (out / "table.txt").read_text() == "second"
    assert require_run(out, "extract")["run_id"] == run.run_id != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # no staging or previous run left


def test_a_failed_run_leaves_the_previous_run_and_says_why(tmp_path):
    out = tmp_path / "out"
    first = _complete_run(out, "first")
    with pytest.raises(QualityError):
        with start_run(out, command="test", planned=["extract", "quality"]) as run:
            (run.path / "table.txt").write_text("half")
            run.mark("extract")
            raise QualityError("patients: sex not in set")
    assert (out / "table.txt").read_text() == "first" and require_run(out)["run_id"] == first
    with pytest.raises(RunIncompleteError) as refused:
        require_run(tmp_path / "out.partial", "extract")
    assert refused.value.exit_code == ExitCode.RUN_INCOMPLETE
    assert "failed at stage quality (exit 5): patients: sex not in set" in str(refused.value)
    assert "out holds the last complete run" in str(refused.value)
    # the next run starts afresh over the failed one
    _complete_run(out, "third")
    assert (out / "table.txt").read_text() == "third" and not (tmp_path / "out.partial").exists()


def test_an_interrupted_two_rename_swap_is_finished_by_the_next_run(tmp_path, monkeypatch):
    _no_exchange(monkeypatch)
    out = tmp_path / "out"
    _complete_run(out, "first")
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):  # the process dies between the two renames
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(runfolder.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _complete_run(out, "second")
    monkeypatch.setattr(runfolder.os, "rename", real_rename)
    assert not out.exists() and (tmp_path / "out.previous").is_dir()
    with pytest.raises(RunIncompleteError, match="swap to a new run was interrupted"):
        require_run(out, "extract")
    recover(out)  # what the next start_run does first
    assert (out / "table.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_an_interrupted_swap_without_a_complete_new_run_restores_the_old_one(tmp_path):
    out = tmp_path / "out"
    _complete_run(out, "old")
    os.rename(out, tmp_path / "out.previous")  # the state: old run moved aside, staging unfinished
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "run.json").write_text(json.dumps({"format": 1, "status": "running", "stages": []}))
    recover(out)
    assert (out / "table.txt").read_text() == "old" and require_run(out, "extract") is not None
    assert not (tmp_path / "out.previous").exists()


def test_a_folder_no_run_wrote_is_never_replaced(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AlreadyExistsError, match="no qis-fhir run wrote"):
        _complete_run(out, "x")
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "results.partial").exists()
    assert require_run(out) is None  # not a run folder: the reader decides


def test_an_amendment_is_unmarked_until_done_and_a_failure_is_recorded(tmp_path):
    out = tmp_path / "out"
    _complete_run(out, "t")
    with pytest.raises(QualityError):
        with amend_run(out, needs=("extract",), clears=("outcomes",)) as run:
            (out / "events.txt").write_text("half")
            with pytest.raises(RunIncompleteError, match="has not finished stage outcomes"):
                require_run(out, "outcomes")
            raise QualityError("outcome_events: change out of range")
    with pytest.raises(RunIncompleteError, match="last error at stage outcomes: outcome_events: change out of range"):
        require_run(out, "outcomes")
    assert require_run(out, "extract") is not None  # the finished stages stay readable
    with amend_run(out, needs=("extract",), clears=("outcomes",)) as run:
        run.mark("outcomes", {"events": 1})
    assert require_run(out, "outcomes")["error"] is None


def test_amending_an_unfinished_run_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with start_run(out, command="test", planned=["extract"]):
            raise RuntimeError("boom")
    with pytest.raises(RunIncompleteError, match="failed at stage extract"):
        with amend_run(tmp_path / "out.partial", needs=("extract",), clears=("publish",)):
            pass


def test_a_second_writer_of_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    _complete_run(out, "first")
    with start_run(out, command="test", planned=["extract"]) as run:
        (run.path / "table.txt").write_text("second")
        with pytest.raises(RunIncompleteError, match="another run is writing"):
            _complete_run(out, "intruder")
        with pytest.raises(RunIncompleteError, match="another run is writing"):
            with amend_run(out, needs=("extract",), clears=("publish",)):
                pass
        run.mark("extract")
    assert (out / "table.txt").read_text() == "second"
    _complete_run(out, "third")  # the lock went with the first writer
    assert (out / "table.txt").read_text() == "third"
