"""FHIR dates across FHIR's whole range (years 0001-9999, offsets -14:00..+14:00): each one is read
to its exact UTC instant or refused as out of range, never stored as year 0 or 10000 (which killed
the quality stage), and every date field of every table carries the refusal as ``date_out_of_range``."""

from __future__ import annotations

import copy

import pytest
from extract_helpers import (
    BASE_CONDITION,
    BASE_OBSERVATION,
    BASE_PATIENT,
    BASE_REQUEST,
    FIRST_US,
    LAST_US,
    SECRET,
    fhir_date_strategy,
)
from hypothesis import given, settings

from qis_fhir.fhir.dates import EARLIEST, END, DateOutOfRange, instant_us
from qis_fhir.fhir.fields import make_handlers
from qis_fhir.fhir.keys import OwnKeys
from qis_fhir.fhir.reasons import DATE_OUT_OF_RANGE, Reject
from qis_fhir.fhir.schema import TABLE_OF_TYPE, TABLES
from qis_fhir.privacy.pseudonym import Pseudonymizer


def test_the_window_is_1850_to_2199():
    assert EARLIEST.isoformat() == "1850-01-01T00:00:00+00:00" and END.isoformat() == "2200-01-01T00:00:00+00:00"
    assert instant_us("1850-01-01T00:00:00Z") == FIRST_US
    assert instant_us("2199-12-31T23:59:59.999999Z") == LAST_US


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1850-01-01T14:00:00+14:00", FIRST_US),  # the first instant, written at the easternmost offset
        ("1849-12-31T10:00:00-14:00", FIRST_US),  # ... and at the westernmost: the date before 1850 in local time
        ("1850", FIRST_US),
        ("1850-01", FIRST_US),
        ("1850-01-01", FIRST_US),
        ("2199-12-31T09:59:59.999999-14:00", LAST_US),
        ("2200-01-01T13:59:59.999999+14:00", LAST_US),  # 2200 in local time, 2199 in UTC
        ("2199-12", 7_255_440_000_000_000),
        ("2199", 7_226_582_400_000_000),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000_000),  # a leap second (valid FHIR): 2017-01-01T00:00:00Z
        ("2016-12-31T18:59:60.5-05:00", 1_483_228_800_500_000),
        ("2020-01-01T00:00:00.123456789Z", 1_577_836_800_123_456),  # FHIR allows 9 digits: read to the µs
    ],
)
def test_the_edges_of_the_window_are_read_exactly(text, expected):
    assert instant_us(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:59:59-12:00",  # year 10000 in UTC: stored as such, it crashed the quality stage
        "9999-12-31T23:59:59-14:00",
        "9999-12-31T23:59:59+14:00",
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC: it was stored silently
        "0001-01-01T00:00:00-14:00",
        "0001",
        "0001-01",
        "0001-01-01",
        "9999",
        "9999-12",
        "9999-12-31",
        "1849-12-31T23:59:59.999999Z",
        "1850-01-01T13:59:59.999999+14:00",
        "1849",
        "1849-12",
        "2200-01-01T00:00:00Z",
        "2199-12-31T10:00:00-14:00",
        "2200",
        "2200-01",
        "2400-06-01T12:00:00+00:00",
        "1650-03-01",
    ],
)
def test_valid_fhir_dates_outside_the_window_are_out_of_range(text):
    with pytest.raises(DateOutOfRange):
        instant_us(text)


@settings(max_examples=2000, deadline=None)
@given(fhir_date_strategy())
def test_every_valid_fhir_date_is_read_exactly_or_refused_as_out_of_range(case):
    text, expected = case
    if FIRST_US <= expected <= LAST_US:
        assert instant_us(text) == expected
    else:
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
    for text in ("9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "1650", "2400-01-01"):
        with pytest.raises(Reject) as info:
            handle(_with_date(base, path, text), None, 1)
        assert info.value.reason == DATE_OUT_OF_RANGE
        assert info.value.detail == f"{field} is outside 1850-01-01..2199-12-31 UTC"
    for text, expected in (("1850-01-01T14:00:00+14:00", FIRST_US), ("2199-12-31T09:59:59.999999-14:00", LAST_US)):
        rows = handle(_with_date(base, path, text), None, 1)
        assert rows and all(row[at] == expected for row in rows)
