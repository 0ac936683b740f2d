"""The run-failure alert: what it carries (and never carries), its file, and its webhook."""

from __future__ import annotations

import json
import logging
import socket
import time
from datetime import UTC, datetime

import pytest

from qis_fhir import alerts
from qis_fhir.alerts import alert_path, build_alert, post_webhook, raise_alert
from qis_fhir.errors import ExitCode

AT = datetime(2026, 11, 28, 2, 5, 9, tzinfo=UTC)
PATIENT_TEXT = "KeyError: 'Maria Jones 1961-04-02'"  # what an arbitrary exception might quote


def _failed(**kw):
    base = dict(job="daily_outcomes", run_id="abc123", partition="2026-11-27", step="fhir_extract", at=AT)
    return build_alert(**{**base, **kw})


def test_a_qis_error_carries_its_exit_code_and_message():
    alert = _failed(error_class="InputNotFoundError", error_message="export folder exports/2026-11-27 does not exist\n")
    assert alert.to_dict() == {
        "version": 1,
        "time": "2026-11-28T02:05:09+00:00",
        "job": "daily_outcomes",
        "partition": "2026-11-27",
        "run_id": "abc123",
        "step": "fhir_extract",
        "error_class": "InputNotFoundError",
        "exit_code": int(ExitCode.INPUT_NOT_FOUND),
        "exit_name": "INPUT_NOT_FOUND",
        "message": "export folder exports/2026-11-27 does not exist",
    }


def test_an_exit_code_set_on_a_subclass_of_a_subclass_is_found():
    assert _failed(error_class="NothingExtractedError").exit_name == "NOTHING_EXTRACTED"


def test_any_other_exception_keeps_its_class_but_never_its_message():
    alert = _failed(error_class="KeyError", error_message=PATIENT_TEXT)
    assert alert.error_class == "KeyError"
    assert alert.message is None and alert.exit_code is None
    assert "Maria" not in json.dumps(alert.to_dict()) and "Maria" not in alerts.log_line(alert)


def test_the_file_is_written_atomically_and_an_error_line_logged(tmp_path, caplog, monkeypatch):
    alert = _failed(error_class="QualityError", error_message="1 suite failed")
    writes = []
    real = alerts.write_json
    monkeypatch.setattr(alerts, "write_json", lambda p, d: (writes.append(p), real(p, d)))
    with caplog.at_level(logging.ERROR, logger="qis_fhir.alerts"):
        path = raise_alert(alert, tmp_path)
    assert path == tmp_path / "alerts" / "20261128T020509Z-abc123.json" == alert_path(tmp_path, alert)
    assert writes == [path]  # through files.write_json: temporary file, fsync, rename
    assert json.loads(path.read_text()) == alert.to_dict()
    assert [p.name for p in (tmp_path / "alerts").iterdir()] == [path.name]  # no temporary left behind
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "job daily_outcomes, partition 2026-11-27, run abc123, step fhir_extract: QualityError (exit 5 QUALITY_FAILED)" in errors[0].getMessage()


def test_the_same_json_is_posted_to_the_webhook(tmp_path, receiver):
    server, handler = receiver
    alert = _failed(error_class="NoPeersError", error_message="no DHT peer answered at 127.0.0.1:1")
    path = raise_alert(alert, tmp_path, webhook_url=f"http://127.0.0.1:{server.server_port}/hooks/qis")
    assert handler.received == [("/hooks/qis", "application/json", json.loads(path.read_text()))]


def test_a_refusing_webhook_is_logged_not_raised(tmp_path, receiver, caplog):
    server, handler = receiver
    handler.status = 500
    with caplog.at_level(logging.ERROR, logger="qis_fhir.alerts"):
        assert post_webhook(f"http://127.0.0.1:{server.server_port}/", _failed()) is False
    assert "HTTP 500" in caplog.text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_webhook_that_is_down_is_logged_and_the_file_still_written(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="qis_fhir.alerts"):
        path = raise_alert(_failed(), tmp_path, webhook_url=f"http://127.0.0.1:{_closed_port()}/")
    assert path.is_file()
    assert "alert webhook unreachable for run abc123" in caplog.text


def test_a_webhook_that_never_answers_gives_up_after_the_timeout(caplog):
    with socket.socket() as listener:  # accepts connections (backlog) and never answers them
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        start = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="qis_fhir.alerts"):
            sent = post_webhook(f"http://127.0.0.1:{listener.getsockname()[1]}/", _failed(), timeout=0.5)
        elapsed = time.monotonic() - start
    assert sent is False and "unreachable" in caplog.text
    assert elapsed < 30  # bounded by the timeout (0.5 s), with generous headroom for a loaded machine


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "127.0.0.1:9/x"])
def test_only_http_webhooks_are_opened(url, caplog):
    with caplog.at_level(logging.ERROR, logger="qis_fhir.alerts"):
        assert post_webhook(url, _failed()) is False
    assert "must be http or https" in caplog.text
