"""FHIR date, dateTime and instant strings -> microseconds since the epoch, UTC.

``datetime.fromisoformat`` does the work (it is C and fast); this module only admits the FHIR
shapes (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, ``YYYY-MM-DDThh:mm:ss[.fff][Z|+hh:mm]``) and
rejects the extra ISO forms fromisoformat would also accept (``20200101``, a space separator).
Partial dates map to their first day; a dateTime without an offset is read as UTC. Results are
cached per string because a bulk export repeats the same timestamps (all Observations of one
encounter share one).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_CACHE_MAX = 65_536  # timestamps repeat within an encounter, close together: a small cache catches them
_cache: dict[str, int] = {}


def _parse(text: str, _fromiso=datetime.fromisoformat, _utc=timezone.utc) -> int:
    n = len(text)
    if n > 10 and text[10] == "T" and text[4] == "-" and text[7] == "-":
        # a dateTime, by far the most common shape: tested first, names bound at definition. A
        # timestamp repeats within an encounter, but a real export has many more of them than the
        # cache can hold, so this runs for a good share of the lines (docs/extract.md)
        dt = _fromiso(text)
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
    return (dt - _EPOCH) // _US


def instant_us(text: str) -> int:
    """Microseconds since 1970-01-01 UTC; raises ValueError (never quoting ``text``) when unparseable."""
    value = _cache.get(text)
    if value is None:
        value = _parse(text)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[text] = value
    return value
