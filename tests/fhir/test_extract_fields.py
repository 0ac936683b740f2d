"""Units, dates, keys and the validation sample: the small parts extraction relies on."""

from __future__ import annotations

import copy
import gc

import pytest
from extract_helpers import BP_PANEL, SECRET

from qis_fhir.fhir.dates import instant_us
from qis_fhir.fhir.fields import make_handlers, resolve_reference
from qis_fhir.fhir.keys import OwnKeys
from qis_fhir.fhir.reasons import Reject
from qis_fhir.fhir.units import allowed_units
from qis_fhir.fhir.validation import effective_rate, sample_stride
from qis_fhir.privacy.pseudonym import Pseudonymizer

FIXTURE_UNITS = """mg/dL mm[Hg] mmol/L {score} cm kg kg/m2 fL g/dL % U/L 10*3/uL mL/min/{1.73_m2} kU/L 10*6/uL pg
mL/min g/L Cel ng/mL mg/g mm pg/mL {T-score} {count} {nominal} pH mmol/mol [in_i] [lb_av] /min""".split()


def test_allow_list_covers_every_unit_in_the_fixtures_and_rejects_non_ucum():
    units = allowed_units()
    assert set(FIXTURE_UNITS) <= units
    assert "(score)" not in units and "mg/dl" not in units  # UCUM is case-sensitive


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:01.5+00:00", 1_500_000),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1970-01-02", 86_400_000_000),
        ("1970-02", 31 * 86_400_000_000),
        ("1971", 365 * 86_400_000_000),
        ("1969-12-31T23:59:59Z", -1_000_000),
        ("1970-01-01T00:00:00", 0),  # no offset: read as UTC
    ],
)
def test_fhir_dates_become_utc_microseconds(text, expected):
    assert instant_us(text) == expected


@pytest.mark.parametrize("text", ["", "19700101", "1970-01-01 00:00:00", "1970-13", "yesterday", "1970-02-30", "197",
                                  "1970/01/01T00:00:00", "1970-01-01T25:00:00Z", "19700101T000000"])
def test_non_fhir_dates_are_refused(text):
    with pytest.raises(ValueError):
        instant_us(text)


def test_own_keys_equal_pseudonymizer_keys():
    for secret in (b"s" * 16, b"k" * 32, bytes(range(100))):
        own, memo = OwnKeys(secret), Pseudonymizer(secret)
        for ref in ("Observation/1", "Condition/abc-def", "Patient/" + "x" * 64, "Observation/é"):
            rtype, rid = ref.split("/", 1)
            assert own.for_type(rtype)(rid) == memo.key(ref)


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("Patient/1", "Patient/1"),
        ("Patient/1/_history/3", "Patient/1"),
        ("https://fhir.example.org/r4/Patient/1", "Patient/1"),
        ("urn:uuid:u1", "Patient/p1"),
    ],
)
def test_references_resolve_to_type_and_id(ref, expected):
    assert resolve_reference(ref, "Patient", {"urn:uuid:u1": "Patient/p1"}, "subject") == expected


@pytest.mark.parametrize("ref", ["Group/1", "Patient/", "urn:uuid:unknown", "1"])
def test_bad_references_are_rejected(ref):
    with pytest.raises(Reject) as info:
        resolve_reference(ref, "Patient", {}, "subject")
    assert info.value.reason == "invalid_reference"


def test_sample_stride_follows_the_mode_and_rate():
    assert sample_stride("sample", 0.01) == 100 and effective_rate(100) == 0.01
    assert sample_stride("sample", 0.002) == 500
    assert sample_stride("sample", 0.3) == 3  # the rate used is 1/3, recorded as such
    assert sample_stride("full", 0.0) == 1 and effective_rate(1) == 1.0
    assert sample_stride("off", 0.5) is None and sample_stride("sample", 0.0) is None
    assert effective_rate(None) == 0.0
    with pytest.raises(ValueError):
        sample_stride("some", 0.01)
    with pytest.raises(ValueError):
        sample_stride("sample", 1.5)


def test_check_invariants_names_what_does_not_add_up():
    from qis_fhir.fhir.summary import ExtractSummary

    s = ExtractSummary(export_dir="x", validate="off", validation_sample_rate=0.0)
    s.by_type = {"Observation": {"read": 3, "accepted": 1, "quarantined": 1}}
    s.by_file = {"Observation.ndjson": {"read": 3, "accepted": 1, "quarantined": 1, "skipped": 1}}
    s.totals = {"read": 3, "accepted": 1, "quarantined": 1, "skipped": 1}
    s.quarantine_reasons = {"invalid_json": 1}
    s.skipped_types = {"Encounter": 1}
    s.quarantine_written = 1
    with pytest.raises(AssertionError, match="type Observation"):
        s.check_invariants()
    s.by_type["Observation"]["read"] = 2
    s.check_invariants()


def test_dropped_component_leaves_no_reference_cycle():
    """extract_export pauses the collector for the whole run, so a cycle made per line is memory held
    until the run ends: a kept Reject holds its traceback, the traceback the handler's frame (with
    the parsed line), and the frame's f_back the caller's buffers."""
    dropped: list[str] = []
    handler = make_handlers(Pseudonymizer(SECRET).key, OwnKeys(SECRET).for_type, dropped)["Observation"]
    one_bad = copy.deepcopy(BP_PANEL)
    del one_bad["component"][0]["valueQuantity"]["unit"], one_bad["component"][0]["valueQuantity"]["code"]
    all_bad = copy.deepcopy(one_bad)
    del all_bad["component"][1]["valueQuantity"]["unit"], all_bad["component"][1]["valueQuantity"]["code"]
    assert len(handler(one_bad, None, 1)) == 1  # warm up caches before counting
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        for _ in range(20):
            assert len(handler(one_bad, None, 1)) == 1
            try:
                handler(all_bad, None, 1)
            except Reject as rej:
                assert rej.reason == "missing_unit" and rej.detail.startswith("no numeric value left: ")
            else:
                raise AssertionError("a panel without a usable component must be rejected")
        unreachable = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    assert unreachable == 0
    assert dropped == ["missing_unit"] * 21  # a rejected panel reports no dropped components
