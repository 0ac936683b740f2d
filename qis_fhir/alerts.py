"""A failed run, told to the people who operate the site: one record a team can route.

A failed nightly run is an alert in three forms built from one record: an ERROR log line, a JSON file
``<out_root>/alerts/<time>-<run_id>.json`` (written atomically, so a watcher never reads half of one),
and, when a webhook URL is configured, the same JSON POSTed to it (chat, paging, ticketing).

The record carries what identifies the run and where it broke (job, partition, run id, step), the
error's class, and for a ``QisError`` its exit code and message: those messages are free of patient
text by contract (``qis_fhir/errors.py``). The message and traceback of any other exception are never
included, since nothing promises what they quote (a ``KeyError`` names the key it missed, a parser
error the text it choked on).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from qis_fhir.errors import QisError
from qis_fhir.files import write_json

ALERTS_DIR = "alerts"
WEBHOOK_TIMEOUT = 10.0  # seconds per connect / read: a hung receiver never holds the sensor tick long
ALERT_VERSION = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFailureAlert:
    version: int
    time: str  # UTC, ISO 8601, when the failure was seen
    job: str
    partition: str | None
    run_id: str
    step: str | None  # the first failed step, None when the run failed outside a step
    error_class: str | None  # the exception's class name (never its module path or message)
    exit_code: int | None  # the QisError's exit code; None for any other exception
    exit_name: str | None  # the exit code's name (e.g. INPUT_NOT_FOUND)
    message: str | None  # a QisError's message only

    def to_dict(self) -> dict:
        return asdict(self)


def _qis_error_classes() -> dict[str, type[QisError]]:
    found: dict[str, type[QisError]] = {}
    todo: list[type[QisError]] = [QisError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def build_alert(
    *,
    job: str,
    run_id: str,
    partition: str | None = None,
    step: str | None = None,
    error_class: str | None = None,
    error_message: str | None = None,
    at: datetime | None = None,
) -> RunFailureAlert:
    """The alert record of one failed run. ``error_message`` is kept only when ``error_class`` names
    a ``QisError`` subclass; for anything else it is dropped, whatever it says."""
    at = (at or datetime.now(UTC)).astimezone(UTC)
    qis = _qis_error_classes().get(error_class or "")
    code = qis.exit_code if qis is not None else None
    return RunFailureAlert(
        version=ALERT_VERSION,
        time=at.isoformat(timespec="seconds"),
        job=job,
        partition=partition,
        run_id=run_id,
        step=step,
        error_class=error_class,
        exit_code=int(code) if code is not None else None,
        exit_name=code.name if code is not None else None,
        message=error_message.strip() if qis is not None and error_message else None,
    )


def alert_path(out_root: Path, alert: RunFailureAlert) -> Path:
    stamp = datetime.fromisoformat(alert.time).strftime("%Y%m%dT%H%M%SZ")
    return Path(out_root) / ALERTS_DIR / f"{stamp}-{alert.run_id}.json"


def log_line(alert: RunFailureAlert) -> str:
    where = f"partition {alert.partition}" if alert.partition else "no partition"
    error = alert.error_class or "unknown error"
    if alert.exit_code is not None:
        error += f" (exit {alert.exit_code} {alert.exit_name})"
    line = f"run failed: job {alert.job}, {where}, run {alert.run_id}, step {alert.step or '-'}: {error}"
    return line + (f": {alert.message}" if alert.message else "")


def post_webhook(url: str, alert: RunFailureAlert, *, timeout: float = WEBHOOK_TIMEOUT, logger: logging.Logger | None = None) -> bool:
    """POST the alert as JSON; True when the receiver answered 2xx. Never raises: a webhook that is
    down, slow or refusing is logged and the alert file still stands."""
    logger = logger or log
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):  # urllib would also open file:// and ftp:// URLs
        logger.error("alert webhook not sent: the URL must be http or https, not %r", scheme or "(none)")
        return False
    body = json.dumps(alert.to_dict(), sort_keys=True).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            response.read(65536)
            return True
    except urllib.error.HTTPError as exc:
        logger.error("alert webhook refused the alert of run %s: HTTP %s", alert.run_id, exc.code)
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad host
        logger.error("alert webhook unreachable for run %s: %s", alert.run_id, getattr(exc, "reason", exc))
    return False


def raise_alert(
    alert: RunFailureAlert,
    out_root: Path,
    *,
    webhook_url: str | None = None,
    timeout: float = WEBHOOK_TIMEOUT,
    logger: logging.Logger | None = None,
) -> Path:
    """Write the alert's JSON file, log its ERROR line and POST it to ``webhook_url`` if given."""
    logger = logger or log
    path = alert_path(out_root, alert)
    write_json(path, alert.to_dict())
    logger.error("%s (alert: %s)", log_line(alert), path)
    if webhook_url:
        post_webhook(webhook_url, alert, timeout=timeout, logger=logger)
    return path
