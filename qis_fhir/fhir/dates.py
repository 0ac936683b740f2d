"""FHIR date, dateTime and instant strings -> microseconds since the epoch, UTC.

``datetime.fromisoformat`` does the work (it is C and fast); this module only admits the FHIR
shapes (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, ``YYYY-MM-DDThh:mm:ss[.fff][Z|+hh:mm]``) and
rejects the extra ISO forms fromisoformat would also accept (``20200101``, a space separator, an
hour without minutes or seconds ``T10``, ``T10:00``, an offset without its colon ``+0530``, a comma
before the fraction). The dateTime shape is checked by position, not by a regular expression: a
regex ``fullmatch`` cost 300 ns per timestamp here, twice fromisoformat itself (140 ns).
Partial dates map to their first day; a dateTime without an offset is read as UTC; a leap second
(``23:59:60``, valid FHIR, refused by fromisoformat) is the first instant of the next minute.
Results are cached per string because a bulk export repeats the same timestamps (all Observations
of one encounter share one).

Only instants from ``EARLIEST`` (1850-01-01 UTC) up to the clock are returned; any other valid
date raises ``DateOutOfRange``. FHIR allows years 0001-9999 with offsets up to +-14:00, so
``9999-12-31T23:59:59-12:00`` is year 10000 in UTC: no Python ``datetime``, and great-expectations
died on it (``NotImplementedError``), losing the night's run for one line. Narrower on purpose: no
patient record is dated before 1850 (the fixtures start in 1910), and none of the dates read
(effective, onset, authoredOn, birthDate...) can lie in the future, which the quality suites refuse
for the whole run (``not_in_future`` blocks on one row); a line quarantined loses that line only.
``END`` (2200) caps the clock, so a wrong system clock cannot let in an instant beyond a nanosecond
pandas Timestamp (1677..2262) (docs/extract.md).

Cost: none on a cache hit; on a parse, one comparison with the clock as last read. Only a value past
that reading (a new record, or a bad date) reads the clock again, so a long-lived process (Dagster)
takes records written since it started. The bound only grows, so a cached value stays valid.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
EARLIEST = datetime(1850, 1, 1, tzinfo=UTC)  # the first instant accepted
END = datetime(2200, 1, 1, tzinfo=UTC)  # refused even if the clock were later
_LO = (EARLIEST - _EPOCH) // _US
_HI = (END - _EPOCH) // _US
_clock = time.time_ns
_now_us = _LO - 1  # the latest clock reading, in microseconds (capped below _HI); none yet
_CACHE_MAX = 65_536  # timestamps repeat within an encounter, close together: a small cache catches them
_cache: dict[str, int] = {}
_FRACTION = re.compile(r"\.[0-9]{1,9}(?:Z|[+-][0-9][0-9]:[0-9][0-9])?", re.ASCII)  # the rare tail after seconds


class DateOutOfRange(ValueError):
    """A well-formed FHIR date before ``EARLIEST`` or later than the clock; the message says which
    (written here, never quoting the date)."""


def _leap_second(text: str, _fromiso=datetime.fromisoformat) -> datetime:
    """``hh:mm:60`` read as the next minute's first instant; anything else re-raises fromisoformat's error."""
    if text[16:19] != ":60":
        return _fromiso(text)
    return _fromiso(text[:17] + "59" + text[19:]) + timedelta(seconds=1)


def _fhir_datetime_shape(text: str, n: int) -> bool:
    """``YYYY-MM-DDThh:mm:ss`` then nothing, ``Z``, ``+hh:mm``/``-hh:mm`` or a fraction of 1-9 digits with
    one of those; fromisoformat checks the digits and ranges."""
    if n < 19 or text[13] != ":" or text[16] != ":":
        return False
    if n == 19:
        return True
    tail = text[19]
    if n == 20:
        return tail == "Z"
    if n == 25 and (tail == "+" or tail == "-"):
        return text[22] == ":"
    return tail == "." and _FRACTION.fullmatch(text, 19) is not None


def _parse(text: str, _fromiso=datetime.fromisoformat, _utc=UTC, _lo=_LO) -> int:
    n = len(text)
    if n > 10 and text[10] == "T" and text[4] == "-" and text[7] == "-":
        # a dateTime, by far the most common shape: tested first, names bound at definition. A
        # timestamp repeats within an encounter, but a real export has many more of them than the
        # cache can hold, so this runs for a good share of the lines (docs/extract.md)
        if not _fhir_datetime_shape(text, n):
            raise ValueError("not a FHIR dateTime")
        try:
            dt = _fromiso(text)
        except ValueError:
            dt = _leap_second(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=_utc)
    elif n == 4:
        if not text.isdigit():
            raise ValueError("not a year")
        dt = datetime(int(text), 1, 1, tzinfo=_utc)
    elif n == 7:
        if text[4] != "-" or not (text[:4].isdigit() and text[5:].isdigit()):
            raise ValueError("not a year-month")
        dt = datetime(int(text[:4]), int(text[5:]), 1, tzinfo=_utc)
    elif n == 10:
        if text[4] != "-" or text[7] != "-":
            raise ValueError("not an extended ISO date")
        dt = _fromiso(text).replace(tzinfo=_utc)
    else:
        raise ValueError("not a FHIR date or dateTime")
    us = (dt - _EPOCH) // _US  # aware datetimes subtract exactly, even when the UTC instant is year 0 or 10000
    if _lo <= us <= _now_us:
        return us
    return _beyond_last_reading(us)


def _beyond_last_reading(us: int) -> int:
    """``us`` if it is not in the future after all (the clock read again), else DateOutOfRange."""
    global _now_us
    if us < _LO:
        raise DateOutOfRange(f"is before {EARLIEST:%Y-%m-%d} UTC")
    _now_us = max(_now_us, min(_clock() // 1000, _HI - 1))  # a clock set back (NTP) takes nothing back
    if us > _now_us:
        raise DateOutOfRange("is in the future (later than the time of extraction)")
    return us


def instant_us(text: str) -> int:
    """Microseconds since 1970-01-01 UTC; raises ValueError (never quoting ``text``) when unparseable,
    its subclass ``DateOutOfRange`` when the instant is before ``EARLIEST`` or in the future."""
    value = _cache.get(text)
    if value is None:
        value = _parse(text)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[text] = value
    return value
