"""FHIR dates across FHIR's whole range (years 0001-9999, offsets -14:00..+14:00): each one is read
to its exact UTC instant or refused as out of range (before 1850, or later than the clock), never
stored as year 0 or 10000 (which killed the quality stage), and every date field of every table
carries the refusal as ``date_out_of_range``."""

from __future__ import annotations

import copy

import pytest
from extract_helpers import (
    BASE_CONDITION,
    BASE_OBSERVATION,
    BASE_PATIENT,
    BASE_REQUEST,
    FIRST_US,
    NOW_US,
    SECRET,
    fhir_date_strategy,
    fixed_clock,
)
from hypothesis import given, settings

from qis_fhir.fhir import dates
from qis_fhir.fhir.dates import EARLIEST, DateOutOfRange, instant_us
from qis_fhir.fhir.fields import make_handlers
from qis_fhir.fhir.keys import OwnKeys
from qis_fhir.fhir.reasons import DATE_OUT_OF_RANGE, UNPARSEABLE_DATE, Reject
from qis_fhir.fhir.schema import TABLE_OF_TYPE, TABLES
from qis_fhir.privacy.pseudonym import Pseudonymizer

HOUR_US = 3_600_000_000
BEFORE_1850 = "is before 1850-01-01 UTC"
FUTURE = "is in the future (later than the time of extraction)"


@pytest.fixture(autouse=True)
def clock():
    with fixed_clock():  # the clock reads 2026-06-30T12:00:00Z
        yield


def test_the_window_starts_in_1850():
    assert EARLIEST.isoformat() == "1850-01-01T00:00:00+00:00"
    assert instant_us("1850-01-01T00:00:00Z") == FIRST_US


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1850-01-01T14:00:00+14:00", FIRST_US),  # the first instant, written at the easternmost offset
        ("1849-12-31T10:00:00-14:00", FIRST_US),  # ... and at the westernmost: a date before 1850 in local time
        ("1850", FIRST_US),
        ("1850-01", FIRST_US),
        ("1850-01-01", FIRST_US),
        ("2026-07-01T02:00:00+14:00", NOW_US),  # the clock itself, at both extreme offsets
        ("2026-06-29T22:00:00-14:00", NOW_US),
        ("2026-06-30", NOW_US - 12 * HOUR_US),
        ("2026-06", NOW_US - (29 * 24 + 12) * HOUR_US),
        ("2026", 1_767_225_600_000_000),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000_000),  # a leap second (valid FHIR): 2017-01-01T00:00:00Z
        ("2016-12-31T18:59:60.5-05:00", 1_483_228_800_500_000),
        ("2020-01-01T00:00:00.123456789Z", 1_577_836_800_123_456),  # FHIR allows 9 digits: read to the µs
    ],
)
def test_the_edges_of_the_window_are_read_exactly(text, expected):
    assert instant_us(text) == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("9999-12-31T23:59:59-12:00", FUTURE),  # year 10000 in UTC: stored as such, it crashed the quality stage
        ("9999-12-31T23:59:59-14:00", FUTURE),
        ("9999-12-31T23:59:59+14:00", FUTURE),
        ("0001-01-01T00:00:00+14:00", BEFORE_1850),  # year 0 in UTC: it was stored silently
        ("0001-01-01T00:00:00-14:00", BEFORE_1850),
        ("0001", BEFORE_1850),
        ("0001-01", BEFORE_1850),
        ("0001-01-01", BEFORE_1850),
        ("9999", FUTURE),
        ("9999-12", FUTURE),
        ("9999-12-31", FUTURE),
        ("1849-12-31T23:59:59.999999Z", BEFORE_1850),
        ("1850-01-01T13:59:59.999999+14:00", BEFORE_1850),
        ("1849", BEFORE_1850),
        ("1849-12", BEFORE_1850),
        ("1650-03-01", BEFORE_1850),
        ("2026-07-01T02:00:00.000001+14:00", FUTURE),  # a microsecond after the clock
        ("2026-06-29T22:00:00.000001-14:00", FUTURE),
        ("2026-07-01", FUTURE),
        ("2026-07", FUTURE),
        ("2027", FUTURE),
        ("2400-06-01T12:00:00+00:00", FUTURE),
    ],
)
def test_valid_fhir_dates_outside_the_window_are_out_of_range(text, why):
    with pytest.raises(DateOutOfRange) as info:
        instant_us(text)
    assert str(info.value) == why


@settings(max_examples=2000, deadline=None)
@given(fhir_date_strategy())
def test_every_valid_fhir_date_is_read_exactly_or_refused_as_out_of_range(case):
    text, expected = case
    with fixed_clock():  # hypothesis runs every example inside the one autouse fixture: reset per example
        if FIRST_US <= expected <= NOW_US:
            assert instant_us(text) == expected
        else:
            with pytest.raises(DateOutOfRange):
                instant_us(text)


def test_a_long_running_process_takes_records_written_after_it_started():
    """Dagster keeps one process for many runs: a date refused as future at one run is taken once the
    clock has passed it, and a date taken stays taken (the bound only grows, so the cache holds)."""
    later = "2026-06-30T13:00:00Z"
    with pytest.raises(DateOutOfRange):
        instant_us(later)
    dates._clock = lambda: (NOW_US + 2 * HOUR_US) * 1000
    assert instant_us(later) == NOW_US + HOUR_US
    dates._clock = lambda: NOW_US * 1000  # a clock set back (NTP), read again for a later date,
    with pytest.raises(DateOutOfRange):
        instant_us("2026-06-30T15:00:00Z")
    dates._cache.clear()
    assert instant_us(later) == NOW_US + HOUR_US  # does not refuse what was taken, even uncached


def test_a_wrong_clock_cannot_let_in_an_instant_beyond_2199():
    """END caps the clock: a system clock in 2300 would otherwise let a year-10000 instant through."""
    dates._clock = lambda: 10_413_792_000_000_000 * 1000  # 2300-01-01
    assert instant_us("2199-12-31T23:59:59.999999Z") == 7_258_118_399_999_999
    for text in ("2200-01-01T00:00:00Z", "9999-12-31T23:59:59-12:00"):
        with pytest.raises(DateOutOfRange):
            instant_us(text)


OBS_NO_DATE = {k: v for k, v in BASE_OBSERVATION.items() if k not in ("effectiveDateTime", "issued")}
COND_NO_DATE = {k: v for k, v in BASE_CONDITION.items() if k != "onsetDateTime"}

# (resource, where to put the date, the field the detail names, the column it fills)
DATE_FIELDS = [
    (BASE_OBSERVATION, ["effectiveDateTime"], "effective", "effective"),
    (OBS_NO_DATE, ["effectivePeriod", "start"], "effective", "effective"),
    (OBS_NO_DATE, ["issued"], "effective", "effective"),
    (BASE_CONDITION, ["onsetDateTime"], "onset", "onset"),
    (COND_NO_DATE, ["onsetPeriod", "start"], "onset", "onset"),
    (COND_NO_DATE, ["recordedDate"], "onset", "onset"),
    (BASE_CONDITION, ["abatementDateTime"], "abatement", "abatement"),
    (BASE_CONDITION, ["abatementPeriod", "start"], "abatement", "abatement"),
    (BASE_REQUEST, ["authoredOn"], "authoredOn", "authored_on"),
    (BASE_PATIENT, ["birthDate"], "birthDate", "birth_date"),
    (BASE_PATIENT, ["deceasedDateTime"], "deceasedDateTime", "deceased"),
]


def _with_date(base: dict, path: list[str], text: str) -> dict:
    obj = copy.deepcopy(base)
    if len(path) == 2:
        obj[path[0]] = {path[1]: text}
    else:
        obj[path[0]] = text
    return obj


@pytest.mark.parametrize("base, path, field, column", DATE_FIELDS, ids=lambda v: ".".join(v) if isinstance(v, list) else None)
def test_every_date_field_refuses_out_of_range_and_reads_the_edges(base, path, field, column):
    handlers = make_handlers(Pseudonymizer(SECRET).key, OwnKeys(SECRET).for_type, [])
    rtype = base["resourceType"]
    handle = handlers[rtype]
    at = TABLES[TABLE_OF_TYPE[rtype]].names.index(column)
    for text, why in (("9999-12-31T23:59:59-12:00", FUTURE), ("0001-01-01T00:00:00+14:00", BEFORE_1850),
                      ("1650", BEFORE_1850), ("2400-01-01", FUTURE)):
        with pytest.raises(Reject) as info:
            handle(_with_date(base, path, text), None, 1)
        assert info.value.reason == DATE_OUT_OF_RANGE
        assert info.value.detail == f"{field} {why}"
    for text, expected in (("1850-01-01T14:00:00+14:00", FIRST_US), ("2026-06-29T22:00:00-14:00", NOW_US)):
        rows = handle(_with_date(base, path, text), None, 1)
        assert rows and all(row[at] == expected for row in rows)


# ISO forms datetime.fromisoformat accepts but FHIR does not: each is unparseable, never silently read
NOT_FHIR = [
    "2020-01-01T10",  # hour only
    "2020-01-01T10:00",  # no seconds
    "2020-01-01T10:00:00+0530",  # offset without its colon
    "2020-01-01T10:00:00+05",  # offset without minutes
    "2020-01-01T10:00:00,5Z",  # comma before the fraction
    "2020-01-01T10:00:00.Z",  # a point without digits
    "2020-01-01T10:00:00.1234567890Z",  # ten digits of fraction
    "2020-01-01T100000Z",  # basic format time
    "2020-01-01T10:00:00 ",  # trailing space
]


@pytest.mark.parametrize("text", NOT_FHIR)
def test_iso_forms_that_are_not_fhir_are_unparseable(text):
    with pytest.raises(ValueError) as info:
        instant_us(text)
    assert not isinstance(info.value, DateOutOfRange) and text not in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2020-01-01T10:00:00", "2020-01-01T10:00:00+00:00"),
        ("2020-01-01T10:00:00Z", "2020-01-01T10:00:00+00:00"),
        ("2020-01-01T10:00:00+05:30", "2020-01-01T04:30:00+00:00"),
        ("2020-01-01T10:00:00.5-01:00", "2020-01-01T11:00:00.500000+00:00"),
        ("2020-01-01T10:00:00.123456789Z", "2020-01-01T10:00:00.123456+00:00"),
        ("2020-01-01T10:00:00.25", "2020-01-01T10:00:00.250000+00:00"),
    ],
)
def test_every_fhir_datetime_shape_is_still_read(text, expected):
    from datetime import datetime, timedelta

    epoch = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
    assert instant_us(text) == (datetime.fromisoformat(expected) - epoch) // timedelta(microseconds=1)


def test_a_line_with_an_hour_only_datetime_is_quarantined_as_unparseable():
    handlers = make_handlers(Pseudonymizer(SECRET).key, OwnKeys(SECRET).for_type, [])
    with pytest.raises(Reject) as info:
        handlers["Observation"](_with_date(BASE_OBSERVATION, ["effectiveDateTime"], "2020-01-01T10"), None, 1)
    assert info.value.reason == UNPARSEABLE_DATE
