"""Which files of an export directory are read, and how.

A bulk export names its files for the resource type they hold: ``Observation.ndjson``,
``Observation.000.ndjson``, ``Observation.001.ndjson.gz``, ... Other ``*.ndjson`` files are read too,
taking each line's ``resourceType`` at its word. ``*.json`` (and ``*.json.gz``) files hold one
resource or a Bundle (Synthea writes one transaction Bundle per patient).

Only bulk-export file names appear in the summary and the quarantine. Any other file is named by a
label (``json-file-0003``: the third such file in name order), because Synthea names its Bundle files
after the patient (``Fredrick_Kris_<uuid>.json``) and no output may carry a name or id.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BULK_NAME = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})(?:[._-](?P<part>\d{1,6}))?\.ndjson(?:\.gz)?$")
READ_BUFFER = 1 << 20
# gzip: a damaged stream fails a whole buffer fill, so a smaller buffer loses fewer readable lines
GZIP_BUFFER = 1 << 16
BLOCK_BYTES = 1 << 20  # NDJSON read at a time (at most: see ``line_blocks``)
CORRUPT = (EOFError, OSError, zlib.error)  # how a damaged gzip stream fails (BadGzipFile is an OSError)


class BrokenStream(Exception):
    """A damaged compressed stream stopped an NDJSON file (raised by ``line_blocks``)."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str  # "ndjson" or "json"
    resource_type: str | None  # from a bulk-export file name, else None
    label: str  # how summary.json and quarantine.ndjson name the file


def discover(export_dir: Path) -> tuple[list[SourceFile], int]:
    """The FHIR files directly in ``export_dir`` (sorted by name) and the number of other files."""
    sources: list[SourceFile] = []
    ignored = 0
    other = 0
    for path in sorted(p for p in export_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        name = path.name
        if name.endswith((".ndjson", ".ndjson.gz")):
            m = BULK_NAME.match(name)
            if m:
                sources.append(SourceFile(path, "ndjson", m.group("type"), name))
            else:
                other += 1
                sources.append(SourceFile(path, "ndjson", None, f"ndjson-file-{other:04d}"))
        elif name.endswith((".json", ".json.gz")):
            other += 1
            sources.append(SourceFile(path, "json", None, f"json-file-{other:04d}"))
        else:
            ignored += 1
    return sources, ignored


def open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(reader, raw file): the reader decompresses ``.gz``; the raw file's position gives progress."""
    raw = open(path, "rb", buffering=READ_BUFFER)
    if path.name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), GZIP_BUFFER), raw
    return raw, raw


def line_blocks(path: Path, cap: int, progress: Callable[[int], None] | None = None) -> Iterator[list[bytes | None]]:
    """Yield an NDJSON file's lines a block at a time: lists of lines (bytes without the newline),
    with None for a line longer than the cap, which is read past in blocks and never held whole.

    One ``split`` per block instead of one ``readline`` per line: per line, the caller pays only
    its own loop. A gzip file is read one 64 KiB buffer fill at a time, so where a damaged stream
    stops the file, at most that much of readable lines is lost with it. Raises
    ``BrokenStream`` there (the caller records it as the next line: the rest is unreadable).
    ``progress`` is called with the bytes of the file read since its last call.
    """
    # a block no larger than the cap: then only a line continued from the previous block can
    # exceed it, and just that one is measured. gzip: one buffer fill, so damage loses at most that
    size = max(1, min(GZIP_BUFFER if path.name.endswith(".gz") else BLOCK_BYTES, cap))
    reader, raw = open_binary(path)
    last_pos = 0
    tail = b""  # the unfinished last line of the blocks so far
    skipping = False  # inside a line already reported too long
    try:
        read = reader.read1
        while True:
            try:
                block = read(size)
            except CORRUPT:
                raise BrokenStream from None
            if not block:
                break
            lines = block.split(b"\n")
            end = lines.pop()  # unfinished: b"" when the block ends with a newline
            if skipping:
                if not lines:
                    continue  # no newline yet: still inside the long line
                del lines[0]  # the long line's end
                skipping = False
            elif tail:
                if lines:
                    lines[0] = tail + lines[0]
                    if len(lines[0]) > cap:
                        lines[0] = None
                else:
                    end = tail + end
            tail = end
            if len(tail) > cap:
                lines.append(None)
                tail = b""
                skipping = True
            if lines:
                yield lines
            if progress is not None:
                pos = raw.tell()
                progress(pos - last_pos)
                last_pos = pos
        if tail:
            yield [tail]  # a last line without a newline
    finally:
        if progress is not None:
            progress(path.stat().st_size - last_pos)
        reader.close()
        raw.close()
