"""FHIR date, dateTime and instant strings -> microseconds since the epoch, UTC.

``datetime.fromisoformat`` does the work (it is C and fast); this module only admits the FHIR
shapes (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, ``YYYY-MM-DDThh:mm:ss[.fff][Z|+hh:mm]``) and
rejects the extra ISO forms fromisoformat would also accept (``20200101``, a space separator).
Partial dates map to their first day; a dateTime without an offset is read as UTC; a leap second
(``23:59:60``, valid FHIR, refused by fromisoformat) is the first instant of the next minute.
Results are cached per string because a bulk export repeats the same timestamps (all Observations
of one encounter share one).

Only instants in ``[EARLIEST, END)`` UTC are returned; any other valid date raises
``DateOutOfRange``. FHIR allows years 0001-9999 with offsets up to +-14:00, so
``9999-12-31T23:59:59-12:00`` is year 10000 in UTC: no Python ``datetime``, and great-expectations
died on it (``NotImplementedError``), losing the night's run for one line. The window is narrower on
purpose: no patient record is dated before 1850 or after 2200 (the fixtures span 1910-2023), and
every accepted instant then fits a nanosecond pandas Timestamp (1677..2262) too (docs/extract.md).
Only parsed values are compared and only in-range ones cached: a cache hit costs nothing more.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
EARLIEST = datetime(1850, 1, 1, tzinfo=timezone.utc)  # the first instant accepted
END = datetime(2200, 1, 1, tzinfo=timezone.utc)  # the first instant refused after it
RANGE_TEXT = f"{EARLIEST:%Y-%m-%d}..{END - _US:%Y-%m-%d} UTC"  # for reasons' details and docs
_LO = (EARLIEST - _EPOCH) // _US
_HI = (END - _EPOCH) // _US
_CACHE_MAX = 65_536  # timestamps repeat within an encounter, close together: a small cache catches them
_cache: dict[str, int] = {}


class DateOutOfRange(ValueError):
    """A well-formed FHIR date whose UTC instant lies outside ``[EARLIEST, END)``."""


def _leap_second(text: str, _fromiso=datetime.fromisoformat) -> datetime:
    """``hh:mm:60`` read as the next minute's first instant; anything else re-raises fromisoformat's error."""
    if text[16:19] != ":60":
        return _fromiso(text)
    return _fromiso(text[:17] + "59" + text[19:]) + timedelta(seconds=1)


def _parse(text: str, _fromiso=datetime.fromisoformat, _utc=timezone.utc, _lo=_LO, _hi=_HI) -> int:
    n = len(text)
    if n > 10 and text[10] == "T" and text[4] == "-" and text[7] == "-":
        # a dateTime, by far the most common shape: tested first, names bound at definition. A
        # timestamp repeats within an encounter, but a real export has many more of them than the
        # cache can hold, so this runs for a good share of the lines (docs/extract.md)
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
    if not _lo <= us < _hi:
        raise DateOutOfRange("outside the accepted range")
    return us


def instant_us(text: str) -> int:
    """Microseconds since 1970-01-01 UTC; raises ValueError (never quoting ``text``) when unparseable,
    its subclass ``DateOutOfRange`` when the instant lies outside ``[EARLIEST, END)``."""
    value = _cache.get(text)
    if value is None:
        value = _parse(text)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[text] = value
    return value
