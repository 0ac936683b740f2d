"""Reading a ``*.json`` file (a Bundle, a single resource or a bulk manifest) as a stream.

A JSON file is never read whole. ijson (yajl, in C) reads it in 64 KiB pieces, so whitespace,
however much of it, costs no memory, and one entry at a time is built. A Bundle is read twice:

1. ``scan`` reads every event without building anything and keeps, per entry, its ``fullUrl`` ->
   ``Type/id`` (so ``urn:uuid:`` references resolve, forward ones too), where the Medications are,
   and which entries are over the size cap (``max_line_bytes``). It also checks the whole file is
   valid JSON before a single entry is accepted, as a parse of the whole file did.
2. ``entries`` builds the entries one by one (ijson's C builder), standing a placeholder in for an
   entry over the size cap, which is never built.

What stays in memory is the scan's map, at most one item per entry up to ``max_entries``, and one
entry. The work is bounded by the decompressed size, capped by ``max_bytes``: past it reading stops
and the file is refused. Measured on a Synthea fixture Bundle (0.45 MB, 125 entries): the scan
takes ~3.5 ms and the build ~2.7 ms, where ``orjson.loads`` of the whole file took 0.8 ms
(docs/extract.md, "Bounds").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import ijson

from qis_fhir.fhir import reasons as R
from qis_fhir.fhir.sources import CORRUPT, BrokenStream, SourceFile

PARSE_BUFFER = 1 << 16  # bytes ijson reads at a time: also the precision of an entry's measured size
_STARTS = frozenset({"start_map", "start_array", "null", "boolean", "number", "string"})
_ENTRY = "entry.item"
# the only places ``scan`` looks at
_WATCHED = frozenset({"", "resourceType", "entry", _ENTRY, "entry.item.fullUrl", "entry.item.resource.resourceType",
                      "entry.item.resource.id"})
TOO_LONG = object()  # ``entries`` yields it for an entry over the size cap (never built)


class TooLarge(Exception):
    """The decompressed file is larger than its cap (``max_bytes``)."""


class BadJson(Exception):
    """The file is not JSON; ``reason`` is ``blank_line``, ``not_utf8`` or ``invalid_json``.

    ijson's own message quotes the input around the error, so it is never kept."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Counted:
    """The decompressed bytes as ijson reads them: counted, refused past the cap, and the first
    non-whitespace byte noted (a blank file is ``blank_line``, not ``invalid_json``)."""

    __slots__ = ("_read", "cap", "total", "blank")

    def __init__(self, reader: BinaryIO, cap: int) -> None:
        self._read = reader.read
        self.cap = cap
        self.total = 0
        self.blank = True

    def read(self, n: int = -1) -> bytes:
        try:
            block = self._read(n)
        except CORRUPT:
            raise BrokenStream from None
        self.total += len(block)
        if self.total > self.cap:
            raise TooLarge
        if self.blank and block.strip():
            self.blank = False
        return block


@dataclass
class JsonShape:
    """What ``scan`` learnt of a JSON file."""

    kind: str = "resource"  # "bundle", "manifest", or "resource" (anything else: one resource)
    entry_list: bool | None = None  # Bundle.entry is a list (None: the Bundle has no entry)
    entries: int = 0  # every entry, also those beyond the cap
    size: int = 0  # decompressed bytes
    urns: dict[str, str] = field(default_factory=dict)  # fullUrl -> "Type/id", entries up to the cap
    medications: list[int] = field(default_factory=list)  # entry numbers of Medications, up to the cap
    too_long: set[int] = field(default_factory=set)  # entry numbers over the size cap


def _events(reader: _Counted):
    return ijson.parse(reader, buf_size=PARSE_BUFFER, use_float=True)


def _opened(src: SourceFile, max_bytes: int) -> tuple[_Counted, BinaryIO, BinaryIO]:
    reader, raw = src.open()
    return _Counted(reader, max_bytes), reader, raw


def scan(src: SourceFile, max_bytes: int, max_entry_bytes: int, max_entries: int) -> JsonShape:
    """Pass 1 over a JSON file. Raises ``UnreadableFile``, ``BrokenStream``, ``TooLarge``, ``BadJson``."""
    counted, reader, raw = _opened(src, max_bytes)
    shape = JsonShape()
    top_map = False
    top_type = None
    keys: set[str] = set()
    url = rtype = rid = None
    start = n = 0
    try:
        for prefix, event, value in _events(counted):
            if prefix not in _WATCHED:  # most events: one set lookup
                continue
            if prefix == _ENTRY:
                if event in _STARTS:
                    n += 1
                    url = rtype = rid = None
                    start = counted.total
                    if event == "string" and len(value) > max_entry_bytes:
                        shape.too_long.add(n)
                elif event == "end_map" or event == "end_array":
                    if counted.total - start > max_entry_bytes:
                        shape.too_long.add(n)
                    elif event == "end_map" and n <= max_entries:
                        _remember(shape, n, url, rtype, rid)
            elif prefix == "entry.item.fullUrl":
                url = value if event == "string" else None
            elif prefix == "entry.item.resource.resourceType":
                rtype = value if event == "string" else None
            elif prefix == "entry.item.resource.id":
                rid = value if event == "string" else (None if event == "null" else False)
            elif prefix == "":
                if event == "start_map":
                    top_map = True
                elif event == "map_key" and value in ("output", "transactionTime"):
                    keys.add(value)
            elif prefix == "resourceType":
                if event == "string":
                    top_type = value
            elif shape.entry_list is None and event != "map_key":  # prefix "entry"
                shape.entry_list = event == "start_array"
    except ijson.JSONError:
        raise BadJson(_bad_json_reason(counted)) from None
    finally:
        reader.close()
        raw.close()
    shape.entries = n
    shape.size = counted.total
    if top_map and top_type == "Bundle":
        shape.kind = "bundle"
    elif top_map and top_type is None and {"output", "transactionTime"} <= keys:
        shape.kind = "manifest"
    return shape


def _remember(shape: JsonShape, n: int, url: object, rtype: object, rid: object) -> None:
    """``fullUrl`` -> ``Type/id`` for entry ``n``: an entry without an id but with a ``urn:uuid:``
    fullUrl (a transaction Bundle before the server assigns ids) takes the uuid as its id, as
    ``entries`` gives it, so it and the references to it agree."""
    if rtype == "Medication":
        shape.medications.append(n)
    if type(url) is not str or not rtype:
        return
    if rid is None and url.startswith("urn:uuid:"):
        rid = url[len("urn:uuid:"):]
    if type(rid) is str and rid:
        shape.urns[url] = f"{rtype}/{rid}"


def _bad_json_reason(counted: _Counted) -> str:
    if counted.blank:
        return R.BLANK_LINE
    return R.INVALID_JSON


def entries(src: SourceFile, shape: JsonShape, max_bytes: int, max_entries: int) -> Iterator[tuple[int, object]]:
    """Pass 2: ``(n, entry)`` for the Bundle's entries 1..``max_entries``, each built on its own;
    ``TOO_LONG`` instead of an entry over the size cap. A JSON error here (the file changed since the
    scan) raises ``BrokenStream``, as a damaged stream does. A resource without an id under a
    ``urn:uuid:`` fullUrl is given the uuid as its id (``_remember``)."""
    counted, reader, raw = _opened(src, max_bytes)
    try:
        # ijson builds from the file in C; from a filtered event stream (an entry to leave out) in Python
        source = _without(_events(counted), shape.too_long) if shape.too_long else counted
        for n, entry in enumerate(ijson.items(source, _ENTRY, buf_size=PARSE_BUFFER, use_float=True), 1):
            if n > max_entries:
                return
            if n in shape.too_long:
                yield n, TOO_LONG
                continue
            if type(entry) is dict:
                url, resource = entry.get("fullUrl"), entry.get("resource")
                if type(url) is str and type(resource) is dict and resource.get("id") is None and url.startswith("urn:uuid:"):
                    resource["id"] = url[len("urn:uuid:"):]
            yield n, entry
    except (ijson.JSONError, TooLarge):
        raise BrokenStream from None
    finally:
        reader.close()
        raw.close()


def _without(events, skip: set[int]):
    """The events with each entry numbered in ``skip`` replaced by a null: it is never built."""
    n = 0
    for prefix, event, value in events:
        if prefix == _ENTRY and event in _STARTS:
            n += 1
            if n in skip:
                yield _ENTRY, "null", None
                if event == "start_map" or event == "start_array":
                    end = "end_map" if event == "start_map" else "end_array"
                    for p, e, _ in events:
                        if p == _ENTRY and e == end:
                            break
                continue
        yield prefix, event, value


def read_small(src: SourceFile, size: int) -> bytes:
    """The whole decompressed file, known (from ``scan``) to be ``size`` bytes, under the line cap."""
    counted, reader, raw = _opened(src, size)
    try:
        return counted.read(size + 1)
    except TooLarge:
        raise BrokenStream from None
    finally:
        reader.close()
        raw.close()
