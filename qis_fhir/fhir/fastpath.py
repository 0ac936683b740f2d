"""The Observation fast path: the common shape of a bulk-export Observation line, decoded by msgspec.

Observations are ~90 % of a bulk export's lines, so their per-line cost is the extractor's speed.
``orjson.loads`` builds a dict of every field of the line (categories, displays, meta...) only for
``fields.py`` to read eight of them and check each in Python. msgspec decodes the same bytes straight
into the typed structs below: it skips the fields we do not read (still checking their JSON syntax),
and checks in C every type, length, code system and unit the Python checks would. Measured on the
bench's lines it decodes in ~55 % of an orjson parse (docs/extract.md).

The fast path is *sound, not complete*: it takes a line only when the checked path (``orjson`` +
``fields.py``'s ``observation``) would accept it with identical rows, and declines anything else:
any decode or validation error, a non-ASCII line (msgspec does not check the UTF-8 of fields it skips,
orjson does), a reference that is not a plain ``Patient/<id>``, a code with several codings, a value
with a comparator, an unlisted unit, a malformed component, a date that does not parse or lies
outside the accepted range (``dates.py``). Those lines go the checked way, which alone
decides whether a line is quarantined and why. A test holds the two paths to identical rows on the
Synthea fixtures and on lines built to probe every rule above. The one known difference: a number
beyond the float range (1e400) in a field not read, which orjson refuses and msgspec skips unread
(docs/extract.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import msgspec

from qis_fhir.fhir.dates import _cache as _date_cache
from qis_fhir.fhir.dates import instant_us
from qis_fhir.fhir.fields import MAX_ID_CHARS
from qis_fhir.fhir.systems import UCUM
from qis_fhir.fhir.units import allowed_units

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_Unit = Literal[tuple(sorted(allowed_units()))]  # type: ignore[valid-type]
# gc=False: the structs hold only strings, numbers and other structs, never a cycle, so the collector
# need not track the ~6 made per line (extract_export pauses it anyway; this saves the bookkeeping)


class _Coding(msgspec.Struct, gc=False):
    system: _NonEmpty
    code: _NonEmpty


class _Concept(msgspec.Struct, gc=False):
    # exactly one coding: with several, fields.pick_coding prefers LOINC, which is the checked path's call
    coding: Annotated[list[_Coding], msgspec.Meta(min_length=1, max_length=1)]


class _Reference(msgspec.Struct, gc=False):
    # "Patient/" + 1..64 characters; the rest of the plain-reference test is in Python below
    reference: Annotated[str, msgspec.Meta(min_length=9, max_length=8 + MAX_ID_CHARS)]


class _Quantity(msgspec.Struct, gc=False):
    value: float  # JSON integers decode as floats; msgspec refuses a number beyond the float range
    system: Literal[UCUM]  # type: ignore[valid-type]
    code: _Unit
    comparator: msgspec.UnsetType = msgspec.UNSET  # present at all (even null) -> the checked path


class _Component(msgspec.Struct, gc=False):
    code: _Concept
    valueQuantity: _Quantity | None = None  # noqa: N815 (FHIR's name)


class _Observation(msgspec.Struct, gc=False):
    resourceType: Literal["Observation"]  # noqa: N815
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    status: _NonEmpty
    code: _Concept
    subject: _Reference
    effectiveDateTime: str  # noqa: N815 (absent -> effectivePeriod / issued: the checked path)
    valueQuantity: _Quantity | None = None  # noqa: N815
    component: list[_Component] | None = None


def observation_decoder() -> msgspec.json.Decoder:
    """The fast path's parse alone: bytes -> the typed structs (the bench times it beside orjson)."""
    return msgspec.json.Decoder(_Observation)


BlockTaker = Callable[[list, int, list], "tuple[list[int], int]"]


def observation_blocks(patient_key: Callable[[str], str], stride: int, first: int) -> BlockTaker:
    """``take(lines, start, out)``: the fast path over one block of an Observation file.

    ``lines`` are the block's lines (None for one over the length cap), ``lines[0]`` being line
    ``start + 1`` of its file. The rows of every line the fast path takes are appended to ``out``;
    it returns the numbers of the lines it declined, for the checked path, and how many lines it
    took that have no numeric value (accepted without rows). A line the model-validation sample picks
    (``lineno % stride == first``) is always declined: the checked path validates it.

    One call per block, the loop inside: a Python call per line would cost a sixth of a parse.
    ``patient_key`` is memoised by the caller's ``Pseudonymizer``; the local dict in front of it
    holds references already checked to be plain ``Patient/<id>``, so a known patient costs one lookup.
    """
    decode = observation_decoder().decode
    DecodeError = msgspec.DecodeError  # ValidationError is a subclass
    date_get = _date_cache.get
    keys: dict[str, str] = {}
    key_get = keys.get

    def take(lines: list, start: int, out: list) -> tuple[list[int], int]:
        declined: list[int] = []
        decline = declined.append
        append = out.append
        empty = 0
        lineno = start
        for line in lines:
            lineno += 1
            if line is None or lineno % stride == first or not line.isascii():
                decline(lineno)
                continue
            try:
                o = decode(line)
            except (DecodeError, RecursionError):  # msgspec nests by recursion: ~1,000 deep raises
                decline(lineno)
                continue
            if "/" in o.id:
                decline(lineno)
                continue
            ref = o.subject.reference
            pk = key_get(ref)
            if pk is None:
                if not ref.startswith("Patient/") or ref.find("/", 8) >= 0:
                    decline(lineno)
                    continue
                pk = patient_key(ref)
                if len(keys) >= 100_000:
                    keys.clear()
                keys[ref] = pk
            eff = o.effectiveDateTime
            ts = date_get(eff)
            if ts is None:
                try:
                    ts = instant_us(eff)
                except (ValueError, OverflowError):
                    decline(lineno)  # the checked path quarantines it: unparseable_date or date_out_of_range
                    continue
            coding = o.code.coding[0]
            vq = o.valueQuantity
            comps = o.component
            if comps is None:
                if vq is None:
                    empty += 1  # accepted, no numeric value (valueCodeableConcept, valueString...)
                else:
                    append((pk, coding.system, coding.code, None, vq.value, vq.code, ts, o.status, lineno))
                continue
            status = o.status
            n = len(out)
            if vq is not None:
                append((pk, coding.system, coding.code, None, vq.value, vq.code, ts, status, lineno))
            panel = coding.code
            for comp in comps:
                cvq = comp.valueQuantity
                if cvq is not None:
                    cc = comp.code.coding[0]
                    append((pk, cc.system, cc.code, panel, cvq.value, cvq.code, ts, status, lineno))
            if len(out) == n:
                empty += 1  # a panel of coded components only
        return declined, empty

    return take
