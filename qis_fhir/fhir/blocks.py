"""The block path for bulk ``Observation*.ndjson`` files: many lines parsed at once by Arrow.

Opt-in (``extract_export(..., block_path=True)``): measured 1.1-1.3x the per-line reader on the
bench's uniform synthetic lines, but 0.8-0.85x on Synthea-shaped ones (longer lines, 15 % of them
panels, coded results or non-ASCII, which Arrow parses and the per-line path then reads again); see
docs/extract.md. It is kept, with tests proving identical outputs, as the measured basis for that
decision and for exports of short uniform lines.

The per-line path (``_Extraction._typed_ndjson``) parses each line with ``orjson`` and checks it in
Python; that costs ~8 µs a line, most of it interpreter overhead. Here a block of complete lines
(8 MiB) is parsed by ``pyarrow.json.read_json`` into columns of only the fields an Observation row
needs, and the common shape (the same conditions as ``fields.observation_fast``: one coding, a UCUM
``valueQuantity``, an ``effectiveDateTime``, no components) is checked and turned into rows with
Arrow compute, column by column.

Correctness comes first; this path only ever *accepts* lines, and only lines it can decide exactly:

- every line it cannot decide goes, in file order, through ``handle_line`` (exactly the per-line
  path's logic): lines of another shape, lines with non-ASCII bytes (UTF-8 validity, BOMs),
  ``NaN``/``Infinity`` (Arrow accepts them, orjson does not), a ``"comparator"`` key (Arrow cannot
  tell ``null`` from absent), lines longer than 2,000 bytes (orjson refuses nesting deeper than
  1024, Arrow does not; such a depth needs more than 2,048 bytes) or over the line cap, values equal
  to 0 (``-0`` is an int 0 for orjson, -0.0 for Arrow) or beyond 2^53 (int rounding), dates not of
  the form ``YYYY-MM-DDThh:mm:ss[.fff|.ffffff](Z|±hh:mm)``;
- the whole block goes through ``handle_line`` when Arrow refuses it (a field of another JSON type,
  a duplicate key, invalid JSON), when a line does not start with ``{`` (blank or whitespace lines,
  which Arrow skips) or when Arrow finds more rows than lines (two objects on one line);
- sampled model validation (the same CRC-32 sample over the same bytes) runs on the sampled lines.

Rows of both kinds are merged back into file order before they reach the table, and quarantine
records are written in line order, so the outputs equal the per-line path's (tests compare them on
the fixtures, a synthetic export and malformed lines).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from qis_fhir.fhir.fields import MAX_ID_CHARS
from qis_fhir.fhir.schema import TABLES, TS
from qis_fhir.fhir.units import UCUM_SYSTEM, allowed_units

BLOCK_BYTES = 8 << 20
DEPTH_SAFE_BYTES = 2_000  # a line this short cannot nest deeper than orjson's limit of 1024
_MAX_EXACT = float(1 << 53)
_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3}|\.[0-9]{6})?(Z|[+-][0-9]{2}:[0-9]{2})$"
_TEXT_FLAGS = (b'"comparator"', b"NaN", b"Infinity")

_CODING = pa.list_(pa.struct([("system", pa.string()), ("code", pa.string())]))
_QUANTITY = pa.struct([("value", pa.float64()), ("system", pa.string()), ("code", pa.string())])
READ_SCHEMA = pa.schema(
    [
        ("resourceType", pa.string()),
        ("id", pa.string()),
        ("status", pa.string()),
        ("subject", pa.struct([("reference", pa.string())])),
        ("code", pa.struct([("coding", _CODING)])),
        ("effectiveDateTime", pa.string()),
        ("valueQuantity", _QUANTITY),
        ("component", pa.list_(pa.struct([]))),  # only whether it is there matters
    ]
)
_PARSE = pj.ParseOptions(explicit_schema=READ_SCHEMA, unexpected_field_behavior="ignore")
_READ = pj.ReadOptions(use_threads=False, block_size=BLOCK_BYTES + (1 << 20))
OBS_SCHEMA = TABLES["observations"]
_OBS_STRUCT = pa.struct(list(OBS_SCHEMA))


class BlockRejected(Exception):
    """Arrow cannot decide this block line by line: the caller runs every line the per-line way."""


def line_bounds(block: bytes, scratch: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every line of ``block`` (lengths without the newline). ``scratch`` holds a
    bool buffer reused from block to block (a fresh 8 MiB array per block costs its page faults)."""
    size = len(block)
    if scratch is None:
        scratch = []
    if not scratch or len(scratch[0]) < size:
        scratch[:] = [np.empty(max(size, BLOCK_BYTES + (1 << 20)), dtype=bool)]
    is_nl = np.equal(np.frombuffer(block, dtype=np.uint8), 10, out=scratch[0][:size])
    nl = np.flatnonzero(is_nl)
    if not block.endswith(b"\n"):
        nl = np.append(nl, size)
    starts = np.empty(len(nl), dtype=np.int64)
    if len(nl):
        starts[0] = 0
        starts[1:] = nl[:-1] + 1
    return starts, nl - starts


def _text_flags(block: bytes, starts: np.ndarray, flags: np.ndarray) -> None:
    """Flag the lines holding a pattern Arrow reads differently from orjson, or any non-ASCII byte."""
    for pat in _TEXT_FLAGS:
        if pat == b"NaN" and block.find(b"N") < 0:  # memchr: much faster than a 3-byte search
            continue
        pos = block.find(pat)
        while pos >= 0:
            i = int(np.searchsorted(starts, pos, side="right")) - 1
            flags[i] = True
            nxt = block.find(b"\n", pos)
            if nxt < 0:
                break
            pos = block.find(pat, nxt)
    if not block.isascii():
        arr = np.frombuffer(block, dtype=np.uint8)
        where = np.flatnonzero(arr >= 0x80)
        flags[np.searchsorted(starts, where, side="right") - 1] = True


def _byte_counts(arr: pa.Array, byte: int) -> np.ndarray:
    """How many times ``byte`` occurs in each string of ``arr`` (0 for nulls), in one numpy pass over
    the values buffer: Arrow's per-string substring kernels cost ~70 ns a string here."""
    n = len(arr)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32)[arr.offset: arr.offset + n + 1]
    if data_buf is None or n == 0:
        return np.zeros(n, dtype=np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]]
    hits = np.flatnonzero(data == byte) + offsets[0]
    return np.bincount(np.searchsorted(offsets, hits, side="right") - 1, minlength=n)


def _first_coding(coding: pa.ListArray) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(has exactly one coding, its system, its code): read straight from the list's child arrays."""
    n = len(coding)
    one = pc.fill_null(pc.equal(pc.list_value_length(coding), 1), False).to_numpy(zero_copy_only=False)
    values = coding.values
    if len(values) == 0 or not one.any():
        empty = pa.nulls(n, type=pa.string())
        return np.zeros(n, dtype=bool), empty, empty
    first = np.minimum(coding.offsets.to_numpy()[:-1], len(values) - 1)
    c0 = values.take(pa.array(first))
    return one, pc.struct_field(c0, "system"), pc.struct_field(c0, "code")


def simple_rows(table: pa.RecordBatch, flags: np.ndarray, units: pa.Array):
    """Mask of the rows the Arrow path decides (``observation_fast``'s accept conditions, exactly), and
    their columns: (ids, refs, system, code, value, unit, effective, status). Lengths are in bytes:
    a line with any non-ASCII byte is flagged, so bytes are characters on every row that can pass."""
    rid = table.column("id")
    ref = pc.struct_field(table.column("subject"), "reference")
    one, system, code = _first_coding(pc.struct_field(table.column("code"), "coding"))
    status = table.column("status")
    eff = table.column("effectiveDateTime")
    vq = table.column("valueQuantity")
    value = pc.struct_field(vq, "value")
    usys = pc.struct_field(vq, "system")
    unit = pc.struct_field(vq, "code")
    id_len = pc.binary_length(rid)
    ref_len = pc.binary_length(ref)
    conds = [
        pc.equal(table.column("resourceType"), "Observation"),
        pc.greater(id_len, 0),
        pc.less_equal(id_len, MAX_ID_CHARS),
        pc.starts_with(ref, "Patient/"),
        pc.greater(ref_len, 8),
        pc.less_equal(ref_len, 72),
        pc.greater(pc.binary_length(system), 0),
        pc.greater(pc.binary_length(code), 0),
        pc.greater(pc.binary_length(status), 0),
        pc.match_substring_regex(eff, _DATE),
        pc.invert(pc.starts_with(eff, "0000")),
        pc.not_equal(value, 0.0),
        pc.less(pc.abs(value), _MAX_EXACT),
        pc.equal(usys, UCUM_SYSTEM),
        pc.is_in(unit, value_set=units),
        pc.is_null(table.column("component")),
    ]
    mask = conds[0]
    for c in conds[1:]:
        mask = pc.and_kleene(mask, c)
    mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False) & one & ~flags
    # no "/" in the id; exactly one in the reference (the one of "Patient/")
    mask &= (_byte_counts(rid, 0x2F) == 0) & (_byte_counts(ref, 0x2F) == 1)
    return mask, (rid, ref, system, code, value, unit, eff, status)


def hex_keys(digests: bytes, n: int, chars: int) -> pa.Array:
    """Lower-case hex of the first ``chars // 2`` bytes of each 32-byte digest, as a string array."""
    raw = np.frombuffer(digests, dtype=np.uint8).reshape(n, 32)[:, : chars // 2]
    lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((n, chars), dtype=np.uint8)
    out[:, 0::2] = lut[raw >> 4]
    out[:, 1::2] = lut[raw & 15]
    offsets = np.arange(0, chars * (n + 1), chars, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


class ObservationBlocks:
    """Runs the block path for one extraction; ``handle_line`` is the per-line path for one line."""

    def __init__(
        self,
        own_key_states: tuple,
        key_chars: int,
        patient_key: Callable[[str], str],
        sample_threshold: int | None,
        sample_scale: int,
    ) -> None:
        self._inner, self._outer = own_key_states  # SHA-256 states with HMAC pads and "Observation/" hashed
        self._key_chars = key_chars
        self._patient_key = patient_key
        self._threshold = sample_threshold
        self._scale = sample_scale
        self.units = pa.array(sorted(allowed_units()), type=pa.string())
        self.scratch: list[np.ndarray] = []  # this run's newline buffer (never shared between runs)
        self.decided = 0  # lines accepted by Arrow compute alone (tests check the path is really taken)
        self.blocks_per_line = 0  # blocks Arrow could not read row-for-line

    def observation_keys(self, ids: pa.Array) -> pa.Array:
        """HMAC-SHA256 of ``Observation/<id>`` per row, as ``OwnKeys`` computes it, with the per-row
        steps as C-level ``map`` calls (no Python bytecode per row)."""
        n = len(ids)
        if n == 0:
            return pa.array([], type=pa.string())
        raw = pc.cast(ids, pa.binary()).to_pylist()
        cls = type(self._inner)
        inner = list(map(cls.copy, itertools.repeat(self._inner, n)))
        for _ in map(cls.update, inner, raw):
            pass
        outer = list(map(cls.copy, itertools.repeat(self._outer, n)))
        for _ in map(cls.update, outer, map(cls.digest, inner)):
            pass
        return hex_keys(b"".join(map(cls.digest, outer)), n, self._key_chars)

    def patient_keys(self, refs: pa.Array) -> pa.Array:
        """Patient keys through the memoised pseudonymiser, once per distinct reference."""
        enc = pc.dictionary_encode(refs)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        keys = pa.array([self._patient_key(r) for r in enc.dictionary.to_pylist()], type=pa.string())
        return pc.take(keys, enc.indices)

    def sampled(self, block: bytes, starts: np.ndarray, lens: np.ndarray, ends_with_newline: bool) -> np.ndarray | None:
        """Which lines the CRC-32 sample validates: the same bytes as the per-line path's (the line
        and its newline), read through memoryview slices rather than copied out line by line."""
        if self._threshold is None:
            return None
        ends = starts + lens + 1
        if not ends_with_newline:
            ends[-1] -= 1
        view = memoryview(block)
        parts = map(view.__getitem__, map(slice, starts.tolist(), ends.tolist()))
        crcs = np.fromiter(map(zlib.crc32, parts), dtype=np.int64, count=len(starts))
        return crcs % self._scale < self._threshold

    def parse(self, block: bytes, starts: np.ndarray, lens: np.ndarray, cap: int):
        """Arrow columns of a block and the per-line flags; raises ``BlockRejected`` when the block
        cannot be read row-for-line."""
        n = len(starts)
        first = np.frombuffer(block, dtype=np.uint8)[np.minimum(starts, len(block) - 1)]
        if (lens == 0).any() or (first != 0x7B).any():  # blank lines, leading whitespace: per line
            raise BlockRejected
        try:
            table = pj.read_json(pa.BufferReader(block), read_options=_READ, parse_options=_PARSE)
        except (pa.ArrowInvalid, UnicodeDecodeError):
            raise BlockRejected from None
        if table.num_rows != n:
            raise BlockRejected
        table = table.combine_chunks().to_batches()[0]  # one batch: its columns are plain arrays
        flags = lens > min(cap, DEPTH_SAFE_BYTES)
        _text_flags(block, starts, flags)
        return table, flags

    def rows(self, mask: np.ndarray, cols) -> pa.Table:
        """The observation rows of the rows in ``mask``, as an Arrow table of the observations schema."""
        if not mask.all():
            keep = pa.array(mask)
            cols = [c.filter(keep) for c in cols]
        rid, ref, system, code, value, unit, eff, status = cols
        try:
            effective = pc.cast(eff, TS)
        except pa.ArrowInvalid:  # a calendar-impossible date (02-30): the caller goes per line
            raise BlockRejected from None
        arrays = [
            self.observation_keys(rid),
            self.patient_keys(ref),
            system,
            code,
            pa.nulls(len(rid), type=pa.string()),
            value,
            unit,
            effective,
            status,
        ]
        return pa.Table.from_arrays(arrays, schema=OBS_SCHEMA)


def tuples_table(rows: list[tuple]) -> pa.Table:
    """Row tuples (``fields.py`` order) as an observations table, the way ``TableSink`` converts them."""
    if not rows:
        return OBS_SCHEMA.empty_table()
    batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=_OBS_STRUCT))
    return pa.Table.from_batches([batch], schema=OBS_SCHEMA)
