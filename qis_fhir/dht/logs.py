"""Log lines a network peer can cause: at most one per reason per second, plus counts of the rest.

rpcudp and kademlia log a warning per odd datagram ("received datagram too small from ...",
"has no callable method rpc_<whatever the peer sent>"): 40,000 junk datagrams wrote 4,869 lines to a
node's log, a third of them quoting text the sender chose. :class:`RateLimit` is a
``logging.Filter`` put on the handler every DHT log line reaches (ours and the libraries'). A
*reason* is the logger name, the unformatted message template and, where one template serves
several reasons, the record's ``extra={"log_reason": ...}``; the first record of a reason in each
second passes, later ones are counted, and :func:`write_summaries` (every ``SUMMARY_INTERVAL``
seconds in a running node) writes one line with the suppressed counts per reason.

The libraries' lines are also stripped of their arguments (peer addresses, message ids, and text
chosen by the sender, such as an RPC name): only the template is written, so nothing a peer sends
reaches the log. Our own lines carry counts, reasons and our own settings, never a peer's text.
"""

from __future__ import annotations

import logging
import re
import threading
import time

LIBRARY_LOGGERS = ("rpcudp", "kademlia")
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGc%]")
SUMMARY_INTERVAL = 10.0
_UNTRACKED = ("", "(more reasons than tracked)", "")


def _is_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)


class RateLimit(logging.Filter):
    """At most one record per (logger, template) per ``interval`` seconds; see module docstring."""

    def __init__(self, interval: float = 1.0, max_reasons: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self.max_reasons = max_reasons
        self._last: dict[tuple[str, str, str], float] = {}
        self._suppressed: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        if _is_library(record.name):
            record.msg = _PLACEHOLDER.sub("?", template).replace("%%", "%")
            record.args = None
            record.exc_info = record.exc_text = None  # an exception's text can quote the datagram
        reason = (record.name, template, str(getattr(record, "log_reason", "")))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.interval:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return False
            if last is None and len(self._last) >= self.max_reasons:
                self._suppressed[_UNTRACKED] = self._suppressed.get(_UNTRACKED, 0) + 1
                return False
            self._last[reason] = now
        return True

    def take_suppressed(self) -> dict[tuple[str, str, str], int]:
        """The counts suppressed since the last call, emptied."""
        with self._lock:
            counts, self._suppressed = self._suppressed, {}
        return counts

    def summary(self) -> str | None:
        counts = self.take_suppressed()
        if not counts:
            return None
        parts = [
            f"{n} x {name}: {_PLACEHOLDER.sub('?', template)!r}" + (f" ({why})" if why else "")
            for (name, template, why), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return f"suppressed {sum(counts.values())} repeated log lines: " + "; ".join(parts)


_summary_log = logging.getLogger("qis_fhir.dht.logs")


def route_to(handler: logging.Handler, level: int, *, limit: RateLimit | None = None) -> RateLimit:
    """Send ``qis_fhir``, ``rpcudp`` and ``kademlia`` records to ``handler`` only (not the root's),
    through one :class:`RateLimit`; the libraries stay at warnings unless ``level`` is debug."""
    limit = limit or RateLimit()
    handler.addFilter(limit)
    for name, lvl in (("qis_fhir", level), *((lib, logging.WARNING if level > logging.DEBUG else logging.DEBUG) for lib in LIBRARY_LOGGERS)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(lvl)
        logger.propagate = False
    return limit


def limit_root(handlers: list[logging.Handler] | None = None, limit: RateLimit | None = None) -> RateLimit:
    """Put one :class:`RateLimit` on ``handlers`` (default: every handler of the root logger: the command
    line's stderr)."""
    limit = limit or RateLimit()
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, RateLimit) for f in handler.filters):  # once, however often the CLI runs
            handler.addFilter(limit)
    return limit


def write_summaries() -> int:
    """Log the suppressed counts of every :class:`RateLimit` on the DHT's handlers (one line each
    that suppressed anything); returns the lines written."""
    limits: list[RateLimit] = []
    for name in ("qis_fhir", *LIBRARY_LOGGERS, ""):
        for handler in logging.getLogger(name or None).handlers:
            limits += [f for f in handler.filters if isinstance(f, RateLimit) and f not in limits]
    written = 0
    for limit in limits:
        line = limit.summary()
        if line is not None:
            _summary_log.warning("%s", line)
            written += 1
    return written
