"""``extract_export``: a FHIR export directory -> five Parquet tables, a summary and a quarantine.

Every line (NDJSON) or Bundle entry (JSON) is read once and ends in exactly one of: accepted (its
rows are written), quarantined (a record with file, line, type and reason), or skipped (a resource
type the pipeline does not extract). ``summary.json`` counts all three per type and per file, and
every path of the folder that is not read, by reason.

The work and memory one file can cost are bounded (docs/extract.md, "Bounds"): lines over
``max_line_bytes`` are read past unparsed, JSON files are streamed (``bundles.py``) and read no
further than ``max_json_bytes`` decompressed, a Bundle's entries beyond ``max_bundle_entries`` are
counted without being read, and at most ``max_quarantine_lines`` records are written per file and
reason. ``summary.json`` says, per file, which cap was hit and what it left out.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from qis_fhir.errors import InputNotFoundError
from qis_fhir.fhir import reasons as R
from qis_fhir.fhir.bundles import TOO_LONG, BadJson, JsonShape, TooLarge, entries, read_small, scan
from qis_fhir.fhir.fastpath import observation_blocks
from qis_fhir.fhir.fields import make_handlers
from qis_fhir.fhir.keys import OwnKeys
from qis_fhir.fhir.r4b import type_word
from qis_fhir.fhir.schema import TABLE_OF_TYPE, TABLES
from qis_fhir.fhir.sinks import DEFAULT_CHUNK_ROWS, QuarantineSink, TableSink
from qis_fhir.fhir.sources import (
    BULK_MANIFEST,
    BrokenStream,
    Labeller,
    SourceFile,
    UnreadableFile,
    discover,
    line_blocks,
)
from qis_fhir.fhir.summary import ExtractSummary
from qis_fhir.fhir.validation import (
    DEFAULT_SAMPLE_RATE,
    DEFAULT_VALIDATE,
    ModelValidator,
    effective_rate,
    sample_stride,
)
from qis_fhir.files import write_json
from qis_fhir.privacy.pseudonym import Pseudonymizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: no real Observation comes near; a runaway line is not parsed
# A JSON file is read no further than this, decompressed: the bound on the work one file costs (a
# Synthea patient Bundle is a few MiB; the fixtures' are 0.45 MB)
DEFAULT_MAX_JSON_BYTES = 256 << 20
# Entries read from one Bundle. Memory holds one small item per entry (its fullUrl and Type/id, ~250
# bytes) while the Bundle is read, so this bounds it to ~50 MB. Real entries are larger than the
# 1.3 KB that would fit 200,000 of them in max_json_bytes (Synthea's average 3.6 KB), so only a
# Bundle of near-empty entries (a gzip of 20 million "{}" is 58 KB) meets the cap.
DEFAULT_MAX_BUNDLE_ENTRIES = 200_000
# Records written to the quarantine per file and reason; every line beyond is still counted
DEFAULT_MAX_QUARANTINE_LINES = 1_000
EXTRACT_DIR = "extract"
SUMMARY_FILE = "summary.json"
QUARANTINE_FILE = "quarantine.ndjson"
UNKNOWN_TYPE = "unknown"
_CORRUPT_DETAIL = "compressed stream is damaged or truncated: the rest of the file is unreadable"
_UNREADABLE_DETAIL = "the file could not be opened (permissions, or it changed while read)"


def _bad_bytes_reason(line: bytes) -> str:
    """Why bytes orjson refused are not a JSON object: blank, not UTF-8, or malformed JSON."""
    if not line.strip():
        return R.BLANK_LINE
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return R.NOT_UTF8
    return R.INVALID_JSON


VALIDATE_BATCH = 64  # sampled resources held, then model-validated together (``_Extraction._settle``)

_BAD_DETAIL = {
    R.BLANK_LINE: "line is empty or whitespace",
    R.NOT_UTF8: "line is not valid UTF-8",
    R.INVALID_JSON: "line is not valid JSON",
}
_REJECTED = object()  # ``_Extraction._parsed``: the line was quarantined (JSON null parses to None)


class _FileCounts:
    __slots__ = ("read", "accepted", "quarantined", "skipped")

    def __init__(self) -> None:
        self.read = self.accepted = self.quarantined = self.skipped = 0

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "accepted": self.accepted, "quarantined": self.quarantined, "skipped": self.skipped}


class _Extraction:
    """One run's state: handlers, sinks and counters. Used once, by ``extract_export``."""

    def __init__(
        self,
        out: Path,
        secret: bytes,
        stride: int | None,
        max_line_bytes: int,
        chunk_rows: int,
        max_json_bytes: int,
        max_bundle_entries: int,
        max_quarantine_lines: int,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_json_bytes = max_json_bytes
        self.max_bundle_entries = max_bundle_entries
        self.dropped: list[str] = []
        patient_key = Pseudonymizer(secret).key
        self.handlers = make_handlers(patient_key, OwnKeys(secret).for_type, self.dropped)
        self.stride = stride
        # the sample validates lines 1, 1 + stride, 1 + 2 * stride... (``_handle``); none: 1 % 1 != -1
        self._stride, self._first = (self.stride, 1 % self.stride) if self.stride is not None else (1, -1)
        self.fast_blocks = {"Observation": observation_blocks(patient_key, self._stride, self._first)}
        self.validator = ModelValidator()
        self.by_type: dict[str, list[int]] = {}  # type -> [read, accepted, quarantined]
        self.skipped_types: Counter = Counter()
        self.reasons: Counter = Counter()
        self.dropped_components: Counter = Counter()
        self.without_rows: Counter = Counter()
        self.by_file: dict[str, _FileCounts] = {}
        self.pending: list[tuple] = []  # sampled resources awaiting model validation
        self.skipped_paths: Counter = Counter()
        self.entries_beyond_cap: dict[str, int] = {}  # file label -> Bundle entries not read
        self.chunk_rows, self.max_quarantine_lines = chunk_rows, max_quarantine_lines
        self.quarantine: QuarantineSink | None = None
        self._open_sinks(out)
        self.progress: Callable[[int], None] | None = None

    def _open_sinks(self, out: Path) -> None:
        extract_dir = out / EXTRACT_DIR
        extract_dir.mkdir(parents=True, exist_ok=True)
        self.sinks: dict[str, TableSink] = {}
        quarantine, self.quarantine = self.quarantine, None
        try:
            for name, schema in TABLES.items():
                self.sinks[name] = TableSink(name, schema, extract_dir / f"{name}.parquet", self.chunk_rows)
            self.quarantine = QuarantineSink(out / QUARANTINE_FILE, self.max_quarantine_lines)
        except BaseException:
            self.abort()
            raise
        if quarantine is not None:  # the counts go on across outputs (``reopen``)
            self.quarantine.not_written, self.quarantine.written = quarantine.not_written, quarantine.written
        self.sink_of_type = {t: self.sinks[table] for t, table in TABLE_OF_TYPE.items()}

    def reopen(self, out: Path) -> None:
        """Commit the outputs so far and write what follows into ``out``, with the same handlers (the
        Medications read so far) and counts: each file of a parallel extraction has its own outputs."""
        self.commit()
        self._open_sinks(out)

    # --- outcomes of one line -------------------------------------------------------------------

    def _type_counts(self, rtype: str) -> list[int]:
        counts = self.by_type.get(rtype)
        if counts is None:
            counts = self.by_type[rtype] = [0, 0, 0]
        return counts

    def reject(self, fc: _FileCounts, label: str, line: int, rtype: str, reason: str, detail: str,
               lines: int = 1) -> None:
        """Quarantine ``lines`` lines (one record) from ``line`` on; the caller counts them as read."""
        self.quarantine.add(label, line, rtype, reason, detail, lines)
        self.reasons[reason] += lines
        fc.quarantined += lines
        counts = self._type_counts(rtype)
        counts[0] += lines
        counts[2] += lines

    def _fault(self, fc: _FileCounts, label: str, line: int, rtype: str, reason: str, detail: str) -> None:
        """A line no loop counted (the file as one unit is line 0; where a damaged stream stopped, the
        next line): one line read, quarantined."""
        fc.read += 1
        self.reject(fc, label, line, rtype, reason, detail)

    def resource(self, obj: object, fc: _FileCounts, label: str, line: int, urns: dict | None, raw: bytes | None) -> None:
        """Take one parsed resource from a Bundle entry, a JSON file or an untyped NDJSON line (the
        caller counts it as read)."""
        if type(obj) is not dict:
            self.reject(fc, label, line, UNKNOWN_TYPE, R.NOT_AN_OBJECT, "resource is not a JSON object")
            return
        rtype = obj.get("resourceType")
        if type(rtype) is not str or not rtype:
            self.reject(fc, label, line, UNKNOWN_TYPE, R.WRONG_RESOURCE_TYPE, "resourceType is missing")
            return
        handler = self.handlers.get(rtype)
        if handler is None:
            fc.skipped += 1
            self.skipped_types[type_word(rtype)] += 1  # an R4B type name, or one fixed word
            return
        self._handle(obj, fc, label, line, rtype, handler, urns, raw)

    def _handle(self, obj: dict, fc: _FileCounts, label: str, line: int, rtype: str, handler, urns: dict | None,
                raw: bytes | None) -> None:
        """A resource of an extracted type through its handler: quarantined, accepted, or held for the
        validation sample, which takes lines (Bundle entries) 1, 1 + stride, 1 + 2 * stride... of a file."""
        try:
            rows = handler(obj, urns, line)
        except R.Reject as rej:
            self.dropped.clear()
            self.reject(fc, label, line, rtype, rej.reason, rej.detail)
            return
        if line % self._stride == self._first:
            if raw is None:
                try:
                    raw = orjson.dumps(obj)
                except orjson.JSONEncodeError:  # a Bundle entry nested deeper than orjson writes
                    self.dropped.clear()
                    self.reject(fc, label, line, rtype, R.INVALID_JSON, "resource is nested too deeply to validate")
                    return
            self._validate_later(fc, label, line, rtype, raw, rows)
        else:
            self._accept(rtype, rows, fc)

    def _parsed(self, fc: _FileCounts, label: str, n: int, rtype: str, line: bytes | None) -> object:
        """NDJSON line ``n`` parsed, or ``_REJECTED`` once quarantined: longer than the cap (None),
        blank, not UTF-8 or not JSON. The caller counts the line as read."""
        if line is None:
            self.reject(fc, label, n, rtype, R.LINE_TOO_LONG, f"line is longer than {self.max_line_bytes} bytes (not parsed)")
            return _REJECTED
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            reason = _bad_bytes_reason(line)
            self.reject(fc, label, n, rtype, reason, _BAD_DETAIL[reason])
            return _REJECTED

    def _accept(self, rtype: str, rows: list, fc: _FileCounts) -> None:
        if rows:
            self.sink_of_type[rtype].add(rows)
        else:
            self.without_rows[rtype] += 1
        if self.dropped:
            self.dropped_components.update(self.dropped)
            self.dropped.clear()
        fc.accepted += 1
        counts = self._type_counts(rtype)
        counts[0] += 1
        counts[1] += 1

    def _validate_later(self, fc: _FileCounts, label: str, line: int, rtype: str, raw: bytes, rows: list) -> None:
        """Hold a sampled resource the field checks accepted until a batch is validated (``_settle``)."""
        self.pending.append((fc, label, line, rtype, raw, rows, self.dropped[:]))
        self.dropped.clear()
        if len(self.pending) >= VALIDATE_BATCH:
            self._settle()

    def _settle(self) -> None:
        """Model-validate the held resources back to back, then accept or quarantine each.

        One validation between thousands of lines of other work costs about twice what it costs
        next to other validations (pydantic's code and data are out of the CPU caches by then);
        batching them saved ~0.2 µs a line at the default sample (docs/extract.md).
        """
        pending, self.pending = self.pending, []
        for fc, label, line, rtype, raw, rows, dropped in pending:
            detail = self.validator.check(rtype, raw)
            if detail is not None:
                self.reject(fc, label, line, rtype, R.MODEL_VALIDATION_FAILED, detail)
            else:
                self.dropped.extend(dropped)
                self._accept(rtype, rows, fc)

    # --- files ----------------------------------------------------------------------------------

    def run_file(self, src: SourceFile) -> None:
        fc = self.by_file.setdefault(src.label, _FileCounts())
        for sink in self.sinks.values():
            sink.begin_file(src.label)
        try:
            if src.kind == "json":
                self._json_file(src, fc)
            elif src.resource_type is not None and src.resource_type not in self.handlers:
                self._skip_file(src, fc)
            elif src.resource_type is not None:
                self._typed_ndjson(src, fc)
            else:
                self._untyped_ndjson(src, fc)
        except UnreadableFile:  # raised on opening, before any line of the file was counted
            self._fault(fc, src.label, 0, src.resource_type or UNKNOWN_TYPE, R.UNREADABLE_FILE, _UNREADABLE_DETAIL)
        self._settle()  # every file's counts are complete when it is done

    def _blocks(self, src: SourceFile):
        return line_blocks(src, self.max_line_bytes, self.progress)

    def _corrupt(self, fc: _FileCounts, label: str, lineno: int, rtype: str) -> None:
        self._fault(fc, label, lineno, rtype, R.CORRUPT_FILE, _CORRUPT_DETAIL)

    def _skip_file(self, src: SourceFile, fc: _FileCounts) -> None:
        """A bulk file of a type the pipeline does not extract: count its lines, do not parse them."""
        n = 0
        try:
            for lines in self._blocks(src):
                n += len(lines)
        except BrokenStream:
            self._corrupt(fc, src.label, n + 1, src.resource_type)
        fc.read += n
        fc.skipped += n
        self.skipped_types[src.resource_type] += n

    def _typed_ndjson(self, src: SourceFile, fc: _FileCounts) -> None:
        """A bulk file of one extracted type: the hot loop. Observation blocks go through the fast
        path (``fastpath.py``), one call per block; the lines it declines, and every line of the
        other types, go through ``_checked_line``."""
        rtype = src.resource_type
        label = src.label
        handler = self.handlers[rtype]
        take = self.fast_blocks.get(rtype)
        sink = self.sink_of_type.get(rtype) if take is not None else None
        checked_line = self._checked_line
        lineno = fast_accepted = without_rows = 0
        blocks = self._blocks(src)
        try:
            for lines in blocks:
                if take is not None:
                    declined, empty = take(lines, lineno, sink.rows)
                    fast_accepted += len(lines) - len(declined)
                    without_rows += empty
                    for n in declined:
                        checked_line(fc, label, rtype, handler, lines[n - lineno - 1], n)
                    if len(sink.rows) >= sink.chunk_rows:
                        sink.flush()
                else:
                    for n, line in enumerate(lines, lineno + 1):
                        checked_line(fc, label, rtype, handler, line, n)
                lineno += len(lines)
        except BrokenStream:
            self._corrupt(fc, label, lineno + 1, rtype)
        finally:
            fc.read += lineno
            # the checked path counted its own lines (_accept, reject); add the fast path's
            fc.accepted += fast_accepted
            if without_rows:
                self.without_rows[rtype] += without_rows
            counts = self._type_counts(rtype)
            counts[0] += fast_accepted
            counts[1] += fast_accepted
            blocks.close()

    def _checked_line(self, fc: _FileCounts, label: str, rtype: str, handler, line: bytes | None, n: int) -> None:
        """Line ``n`` of a typed file the checked way (orjson, ``fields.py``): accepted, quarantined,
        or held for the validation sample (``_settle``), each counted there. The caller counts the
        line as read."""
        obj = self._parsed(fc, label, n, rtype, line)
        if obj is _REJECTED:
            return
        if type(obj) is not dict:
            self.reject(fc, label, n, rtype, R.NOT_AN_OBJECT, "line is not a JSON object")
            return
        if obj.get("resourceType") != rtype:
            self.reject(fc, label, n, rtype, R.WRONG_RESOURCE_TYPE,
                        "resourceType is missing or differs from the file name's type")
            return
        self._handle(obj, fc, label, n, rtype, handler, None, line)

    def _untyped_ndjson(self, src: SourceFile, fc: _FileCounts) -> None:
        """An NDJSON file whose name does not say the type: each line's resourceType decides."""
        label = src.label
        lineno = 0
        try:
            for lines in self._blocks(src):
                for line in lines:
                    lineno += 1
                    obj = self._parsed(fc, label, lineno, UNKNOWN_TYPE, line)
                    if obj is not _REJECTED:
                        self.resource(obj, fc, label, lineno, None, line)
        except BrokenStream:
            self._corrupt(fc, label, lineno + 1, UNKNOWN_TYPE)
        finally:
            fc.read += lineno

    def _json_file(self, src: SourceFile, fc: _FileCounts) -> None:
        """A Bundle (entries are the "lines", numbered from 1) or a single resource (line 1), streamed
        (``bundles.py``); a file that is not JSON, too large or damaged is one quarantined line 0."""
        label = src.label
        try:
            shape = scan(src, self.max_json_bytes, self.max_line_bytes, self.max_bundle_entries)
        except TooLarge:
            self._fault(fc, label, 0, UNKNOWN_TYPE, R.LINE_TOO_LONG,
                        f"JSON file larger than {self.max_json_bytes} bytes decompressed (read no further)")
            return
        except BadJson as bad:
            self._fault(fc, label, 0, UNKNOWN_TYPE, bad.reason, _BAD_DETAIL[bad.reason].replace("line", "file"))
            return
        except BrokenStream:
            self._fault(fc, label, 0, UNKNOWN_TYPE, R.CORRUPT_FILE, "compressed file is damaged or truncated")
            return
        finally:
            if self.progress is not None:
                self.progress(src.size)
        if shape.kind == "manifest":  # a bulk-data $export manifest saved beside the data: not a resource
            del self.by_file[label]
            self.skipped_paths[BULK_MANIFEST] += 1
        elif shape.kind == "bundle":
            self._bundle(src, fc, shape)
        elif shape.size > self.max_line_bytes:
            self._fault(fc, label, 1, UNKNOWN_TYPE, R.LINE_TOO_LONG,
                        f"a single resource longer than {self.max_line_bytes} bytes (not parsed)")
        else:
            try:
                doc = orjson.loads(read_small(src, shape.size))
            except BrokenStream:
                self._corrupt(fc, label, 0, UNKNOWN_TYPE)
                return
            except orjson.JSONDecodeError:  # JSON to yajl, too deep for orjson (over 1,024 levels)
                self._fault(fc, label, 0, UNKNOWN_TYPE, R.INVALID_JSON, _BAD_DETAIL[R.INVALID_JSON])
                return
            fc.read += 1
            self.resource(doc, fc, label, 1, None, None)

    def _bundle(self, src: SourceFile, fc: _FileCounts, shape: JsonShape) -> None:
        """A Bundle's entries, Medications first (so requests that reference them resolve whatever the
        entry order: a pass that stops after the last one), then the rest; those beyond the entry
        cap are counted, in one quarantine record."""
        label = src.label
        if shape.entry_list is None:
            return  # an empty Bundle: nothing to read
        if not shape.entry_list:
            self._fault(fc, label, 0, "Bundle", R.INVALID_FIELD, "Bundle.entry is not a list")
            return
        cap = self.max_bundle_entries
        medications = set(shape.medications)
        last = 0
        try:
            if medications:
                final = shape.medications[-1]
                for n, entry in _closing(entries(src, shape, self.max_json_bytes, cap)):
                    if n in medications:
                        fc.read += 1
                        self._entry(fc, label, n, entry, shape.urns)
                    if n >= final:
                        break
            for n, entry in _closing(entries(src, shape, self.max_json_bytes, cap)):
                last = n
                if n not in medications:
                    fc.read += 1
                    self._entry(fc, label, n, entry, shape.urns)
        except BrokenStream:  # the file changed or broke since the scan: the rest is unreadable
            self._corrupt(fc, label, last + 1, UNKNOWN_TYPE)
            return
        beyond = shape.entries - cap
        if beyond > 0:
            fc.read += beyond
            self.entries_beyond_cap[label] = beyond
            self.reject(fc, label, cap + 1, UNKNOWN_TYPE, R.TOO_MANY_ENTRIES,
                        f"entries beyond the first {cap} of a Bundle are counted, not read", beyond)

    def _entry(self, fc: _FileCounts, label: str, n: int, entry: object, urns: dict) -> None:
        if entry is TOO_LONG:
            self.reject(fc, label, n, UNKNOWN_TYPE, R.LINE_TOO_LONG,
                        f"Bundle entry longer than {self.max_line_bytes} bytes (not parsed)")
            return
        resource = entry.get("resource") if type(entry) is dict else None
        self.resource(resource, fc, label, n, urns, None)

    # --- the end ----------------------------------------------------------------------------------

    def counts(self) -> dict:
        """Every count ``_summarise`` reads, as plain data (a worker's share, ``parallel.add_counts``)."""
        return {"by_type": self.by_type, "skipped_types": dict(self.skipped_types), "reasons": dict(self.reasons),
                "dropped_components": dict(self.dropped_components), "without_rows": dict(self.without_rows),
                "by_file": {label: fc.as_dict() for label, fc in self.by_file.items()},
                "skipped_paths": dict(self.skipped_paths), "entries_beyond_cap": self.entries_beyond_cap,
                "not_written": self.quarantine.not_written, "written": self.quarantine.written,
                "validated": self.validator.validated}

    def commit(self) -> dict[str, int]:
        rows = {}
        for name, sink in self.sinks.items():
            sink.commit()
            rows[name] = sink.count
        self.quarantine.commit()
        return rows

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()
        if self.quarantine is not None:
            self.quarantine.abort()


def _closing(gen):
    """Iterate ``gen`` and close it however the loop ends (its file with it), without waiting for
    the garbage collector, which is paused during the run."""
    try:
        yield from gen
    finally:
        gen.close()


@dataclass(frozen=True)
class ExtractPlan:
    """What one extraction reads and how, everything but the secret: the export's files as outputs
    name them, in order, the tasks they split into (``parallel.tasks``), and the settings.

    Small and plain (labels, indices, numbers), so an orchestrator can hand it from step to step
    (the Dagster extract's ops, ``pipelines/assets/extract.py``) through its storage: no file name
    that may name a patient is in it (``Labeller``), and a step that reads files finds them again
    with :meth:`sources`."""

    export_dir: str
    labels: tuple[str, ...]
    tasks: tuple[tuple[int, ...], ...]
    skipped_paths: dict[str, int]  # the paths not opened, by reason
    validate: str
    stride: int | None
    chunk_rows: int
    limits: dict[str, int]  # max_line_bytes, max_json_bytes, max_bundle_entries, max_quarantine_lines

    def args(self, secret: bytes) -> tuple:
        """``_Extraction``'s arguments after the output folder."""
        lim = self.limits
        return (secret, self.stride, lim["max_line_bytes"], self.chunk_rows, lim["max_json_bytes"], lim["max_bundle_entries"],
                lim["max_quarantine_lines"])

    def sources(self, secret: bytes) -> list[SourceFile]:
        """The planned files, found again (a step on another machine, from the shared volume). Raises
        ``InputNotFoundError`` when the export folder no longer holds the files it held when planned:
        another file order would put rows in other places and leave files out of the counts."""
        export_dir = Path(self.export_dir)
        sources, _ = _discover(export_dir, secret)
        if tuple(s.label for s in sources) != self.labels:
            raise InputNotFoundError(f"the files of {export_dir} changed while it was extracted "
                                     f"({len(self.labels)} planned, {len(sources)} now, or others); extract it again")
        return sources


def _discover(export_dir: Path, secret: bytes) -> tuple[list[SourceFile], Counter]:
    if not export_dir.is_dir():
        raise InputNotFoundError(f"export directory {export_dir} does not exist")
    return discover(export_dir, Labeller(secret))


def plan_extraction(
    export_dir: Path | str,
    *,
    secret: bytes,
    validate: str = DEFAULT_VALIDATE,
    sample_rate: float = DEFAULT_SAMPLE_RATE,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_bundle_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
    max_quarantine_lines: int = DEFAULT_MAX_QUARANTINE_LINES,
) -> tuple[ExtractPlan, list[SourceFile]]:
    """The plan of extracting ``export_dir`` and its files. Raises ``InputNotFoundError`` when the
    folder is missing or holds no FHIR files, ``UsageError`` on a bad validation mode: before any
    output exists."""
    from qis_fhir.fhir.parallel import tasks

    export_dir = Path(export_dir)
    sources, skipped_paths = _discover(export_dir, secret)
    if not sources:
        raise InputNotFoundError(
            f"no FHIR files in {export_dir} (looked for *.ndjson, *.ndjson.gz, *.json, *.json.gz)"
        )
    plan = ExtractPlan(
        export_dir=str(export_dir),
        labels=tuple(s.label for s in sources),
        tasks=tuple(tuple(t) for t in tasks(sources)),
        skipped_paths=dict(skipped_paths),
        validate=validate,
        stride=sample_stride(validate, sample_rate),
        chunk_rows=chunk_rows,
        limits={"max_line_bytes": max_line_bytes, "max_json_bytes": max_json_bytes,
                "max_bundle_entries": max_bundle_entries, "max_quarantine_lines": max_quarantine_lines},
    )
    return plan, sources


def extract_export(
    export_dir: Path | str,
    out_dir: Path | str,
    *,
    secret: bytes,
    validate: str = DEFAULT_VALIDATE,
    sample_rate: float = DEFAULT_SAMPLE_RATE,
    progress: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_bundle_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
    max_quarantine_lines: int = DEFAULT_MAX_QUARANTINE_LINES,
    workers: int = 1,
) -> ExtractSummary:
    """Extract an export directory into ``out_dir/extract/*.parquet``, its summary and the quarantine.

    ``workers`` > 1 reads the files in that many processes (``parallel.py``): the same tables, rows in
    the same order, the same quarantine and summary. Raises ``InputNotFoundError`` when ``export_dir``
    is missing or holds no FHIR files. Bad input never raises: it is quarantined with a reason.
    """
    plan, sources = plan_extraction(export_dir, secret=secret, validate=validate, sample_rate=sample_rate,
                                    max_line_bytes=max_line_bytes, chunk_rows=chunk_rows, max_json_bytes=max_json_bytes,
                                    max_bundle_entries=max_bundle_entries, max_quarantine_lines=max_quarantine_lines)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(sources) > 1:
        from qis_fhir.fhir.parallel import extract_parallel

        rows, counts = extract_parallel(plan, sources, out_dir, secret, workers)
    else:
        from qis_fhir.memory import in_child

        # in a child: the process that read 20 million Observations held 53 MiB more after than at
        # 2 million, although the reading streams (qis_fhir/memory.py)
        rows, counts = in_child(_extract_files, sources, out_dir, plan.args(secret), progress)
    return finish_extraction(plan, rows, counts, out_dir, seconds=time.perf_counter() - started)


def finish_extraction(plan: ExtractPlan, rows: dict[str, int], counts: dict, out_dir: Path, *, seconds: float) -> ExtractSummary:
    """The summary of an extraction whose tables and quarantine are written in ``out_dir``, from the
    tables' row counts and the counts of its reading (``_Extraction.counts``, or the tasks' added up):
    its invariants checked (AssertionError on a bug), then written to ``extract/summary.json``."""
    for reason, n in plan.skipped_paths.items():  # the paths not opened, beside the manifests found on reading
        counts["skipped_paths"][reason] = counts["skipped_paths"].get(reason, 0) + n
    summary = _summarise(counts, plan.stride, Path(plan.export_dir), plan.validate, rows, plan.limits)
    summary.seconds = round(seconds, 3)
    summary.check_invariants()
    write_json(Path(out_dir) / EXTRACT_DIR / SUMMARY_FILE, summary.to_dict())
    return summary


def _extract_files(sources: list[SourceFile], out_dir: Path, args: tuple, progress: bool = False,
                   open_file: Callable[[_Extraction, int], None] | None = None) -> tuple[dict[str, int], dict]:
    """Extract ``sources`` in order, one process; returns the tables' row counts and ``counts()``.
    ``open_file(run, i)``: called before the i-th file (the parallel path gives each its own outputs)."""
    run = _Extraction(out_dir, *args)
    bar = None
    # The loop allocates millions of short-lived, acyclic objects (parsed JSON) while holding a chunk
    # of row tuples alive; the cyclic GC then rescans those rows again and again (~15% of the run).
    # Nothing here forms reference cycles, so the collector is paused for the run and restored after.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if progress:
            bar = _progress_bar(sum(s.size for s in sources))
            run.progress = bar[1]
        for i, src in enumerate(sources):
            if open_file is not None:
                open_file(run, i)
            log.info("extract: reading %s", src.label)
            run.run_file(src)
        rows = run.commit()
    except BaseException:
        run.abort()
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
        if bar is not None:
            bar[0].stop()
    return rows, run.counts()


def _summarise(c: dict, stride: int | None, export_dir: Path, validate: str, rows: dict, limits: dict) -> ExtractSummary:
    by_file = c["by_file"]
    caps_hit: dict[str, dict] = {}
    for label, counts in c["not_written"].items():
        caps_hit.setdefault(label, {})["max_quarantine_lines"] = dict(sorted(counts.items()))
    for label, beyond in c["entries_beyond_cap"].items():
        caps_hit.setdefault(label, {})["max_bundle_entries"] = beyond
    totals = {k: sum(f[k] for f in by_file.values()) for k in ("read", "accepted", "quarantined", "skipped")}
    return ExtractSummary(
        export_dir=str(export_dir),
        validate=validate,
        validation_sample_rate=effective_rate(stride),
        validated=c["validated"],
        totals=totals,
        by_type={t: {"read": n[0], "accepted": n[1], "quarantined": n[2]} for t, n in sorted(c["by_type"].items())},
        skipped_types=dict(sorted(c["skipped_types"].items())),
        by_file=by_file,
        quarantine_reasons=dict(sorted(c["reasons"].items())),
        rows=rows,
        dropped_components=dict(sorted(c["dropped_components"].items())),
        accepted_without_rows=dict(sorted(c["without_rows"].items())),
        skipped_paths=dict(sorted(c["skipped_paths"].items())),
        limits=limits,
        caps_hit=dict(sorted(caps_hit.items())),
        quarantine_written=c["written"],
    )


def _progress_bar(total: int):
    """A rich progress bar over the export's bytes on disk; returns (progress, advance callback)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    task = bar.add_task("extract", total=total)
    bar.start()
    return bar, lambda n: bar.advance(task, n)


def load_extract(out_dir: Path | str) -> dict[str, pd.DataFrame]:  # noqa: F821
    """The five extract tables of ``out_dir`` as DataFrames (Arrow-typed columns kept as pandas types).

    A run folder must hold a complete run that finished its extract (``require_run``): the tables of a
    crashed or failed run are refused with RUN_INCOMPLETE, never read beside another run's files."""
    import pyarrow.parquet as pq

    base = require_extract(out_dir)
    return {name: pq.read_table(base / f"{name}.parquet", schema=TABLES[name]).to_pandas() for name in TABLES}


def require_extract(out_dir: Path | str) -> Path:
    """``out_dir/extract`` once it holds a finished extract's five tables (every reader's check:
    ``load_extract`` and the stages that read the tables in batches or shards, ``fhir/scan.py``)."""
    from qis_fhir.runfolder import EXTRACT, require_run

    require_run(out_dir, EXTRACT)
    base = Path(out_dir) / EXTRACT_DIR
    missing = [name for name in TABLES if not (base / f"{name}.parquet").is_file()]
    if missing:
        raise InputNotFoundError(f"{base} has no extract tables ({', '.join(missing)}); run `qis-fhir extract` first")
    return base
