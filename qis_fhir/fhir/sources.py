"""Which paths of an export directory are read, how they are opened, and how outputs name them.

A bulk export names its files for the resource type they hold: ``Observation.ndjson``,
``Observation.000.ndjson``, ``Observation.001.ndjson.gz``, ``1.Observation.ndjson``... Other
``*.ndjson`` files are read too, taking each line's ``resourceType`` at its word. ``*.json`` (and
``*.json.gz``) files hold one resource or a Bundle (Synthea writes one transaction Bundle per patient).

Every path directly in the folder is either read or counted in ``skipped_paths`` with a reason: a
symlink is followed only when its target lies inside the export folder (``/proc/self/environ`` is
not export data), a directory or device is never opened, and a file is opened only as a regular
file at the place the check found it (``O_NOFOLLOW``, then ``fstat``).

``label`` is the one policy for naming a file in any output (summary, quarantine, ``source_file``,
logs): a bulk-export name (an R4B resource type in one of the patterns above) as it is, anything
else as a keyed hash of its name, because Synthea names Bundle files after the patient
(``Fredrick_Kris_<uuid>.json``) and no output may carry a name or id.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import os
import re
import stat
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qis_fhir.fhir.r4b import resource_types

# optional "<n>." prefix (bulk-data clients number downloads), the type, an optional part number
BULK_NAME = re.compile(r"^(?:\d{1,6}\.)?(?P<type>[A-Z][A-Za-z]{1,63})(?:[._-]\d{1,6})?\.ndjson(?:\.gz)?$")
LABEL_HEX_CHARS = 16  # 64 bits of HMAC-SHA256: distinct for any export's file count, not reversible
READ_BUFFER = 1 << 20
# gzip: a damaged stream fails a whole buffer fill, so a smaller buffer loses fewer readable lines
GZIP_BUFFER = 1 << 16
BLOCK_BYTES = 1 << 20  # NDJSON read at a time (at most: see ``line_blocks``)
CORRUPT = (EOFError, OSError, zlib.error)  # how a damaged gzip stream fails (BadGzipFile is an OSError)

# why a path of the export folder is not read (summary.json ``skipped_paths``)
SYMLINK_OUTSIDE = "symlink_outside_export"
BROKEN_SYMLINK = "broken_symlink"
DIRECTORY = "directory"
NOT_REGULAR = "not_a_regular_file"
HIDDEN = "hidden_file"
NOT_FHIR = "not_fhir_data"  # LICENSE, README: no FHIR file extension
BULK_MANIFEST = "bulk_manifest"  # the $export manifest saved beside the data (found when read)


class BrokenStream(Exception):
    """A damaged compressed stream stopped a file (raised by ``line_blocks`` and the JSON readers)."""


class UnreadableFile(Exception):
    """A file could not be opened (permissions, vanished, replaced by a link out of the folder).

    Carries no message: the operating system's error names the path, which may name a patient."""


@dataclass(frozen=True)
class SourceFile:
    path: Path  # in the export folder (perhaps a symlink to a file inside it: ``open`` checks again)
    root: Path  # the export folder, resolved
    kind: str  # "ndjson" or "json"
    resource_type: str | None  # from a bulk-export file name, else None
    label: str  # how every output names the file (``Labeller``)
    size: int  # bytes on disk when discovered (progress)

    def open(self) -> tuple[BinaryIO, BinaryIO]:
        """(reader, raw file): the reader decompresses ``.gz``; the raw file's position gives progress.

        Raises ``UnreadableFile`` when the path no longer resolves inside the export folder, is not a
        regular file, or cannot be opened."""
        try:
            real = self.path.resolve(strict=True)
            if not real.is_relative_to(self.root):
                raise UnreadableFile
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, RuntimeError):
            raise UnreadableFile from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnreadableFile
            raw = open(fd, "rb", buffering=READ_BUFFER)
        except BaseException:
            os.close(fd)
            raise
        if self.path.name.endswith(".gz"):
            return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), GZIP_BUFFER), raw
        return raw, raw


def bulk_type(name: str) -> str | None:
    """The R4B resource type a bulk-export NDJSON file name announces, or None."""
    m = BULK_NAME.match(name)
    return m.group("type") if m and m.group("type") in resource_types() else None


class Labeller:
    """How outputs name a file of the export: the one place that decides (module docstring)."""

    def __init__(self, secret: bytes) -> None:
        self._mac = hmac.new(secret, b"qis-fhir export file name\0", hashlib.sha256)

    def label(self, name: str, kind: str) -> str:
        """``name`` when it is a bulk-export name, else ``<kind>-file-<keyed hash of the name>``:
        the same name gives the same label every night under the same site secret."""
        if kind == "ndjson" and bulk_type(name) is not None:
            return name
        mac = self._mac.copy()
        mac.update(os.fsencode(name))
        return f"{kind}-file-{mac.hexdigest()[:LABEL_HEX_CHARS]}"


def discover(export_dir: Path, labeller: Labeller) -> tuple[list[SourceFile], Counter]:
    """The FHIR files directly in ``export_dir`` (sorted by name), and every other path counted by
    the reason it is not read."""
    root = export_dir.resolve()
    sources: list[SourceFile] = []
    skipped: Counter = Counter()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        name = entry.name
        path = Path(entry.path)
        try:
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):  # dangling, or a loop
                    skipped[BROKEN_SYMLINK] += 1
                    continue
                if not target.is_relative_to(root):
                    skipped[SYMLINK_OUTSIDE] += 1
                    continue
            st = path.stat()
        except OSError:
            skipped[NOT_REGULAR] += 1  # vanished while listed
            continue
        if stat.S_ISDIR(st.st_mode):
            skipped[DIRECTORY] += 1  # subfolders are not read, whatever their name
        elif not stat.S_ISREG(st.st_mode):
            skipped[NOT_REGULAR] += 1  # a FIFO would block, a device never ends
        elif name.startswith("."):
            skipped[HIDDEN] += 1
        elif name.endswith((".ndjson", ".ndjson.gz")):
            label = labeller.label(name, "ndjson")
            sources.append(SourceFile(path, root, "ndjson", bulk_type(name), label, st.st_size))
        elif name.endswith((".json", ".json.gz")):
            sources.append(SourceFile(path, root, "json", None, labeller.label(name, "json"), st.st_size))
        else:
            skipped[NOT_FHIR] += 1
    return sources, skipped


def line_blocks(src: SourceFile, cap: int, progress: Callable[[int], None] | None = None) -> Iterator[list[bytes | None]]:
    """Yield an NDJSON file's lines a block at a time: lists of lines (bytes without the newline),
    with None for a line longer than the cap, which is read past in blocks and never held whole.

    One ``split`` per block instead of one ``readline`` per line: per line, the caller pays only
    its own loop. A gzip file is read one 64 KiB buffer fill at a time, so where a damaged stream
    stops the file, at most that much of readable lines is lost with it. Raises
    ``BrokenStream`` there (the caller records it as the next line: the rest is unreadable), and
    ``UnreadableFile`` before the first block when the file cannot be opened.
    ``progress`` is called with the bytes of the file read since its last call.
    """
    # a block no larger than the cap: then only a line continued from the previous block can
    # exceed it, and just that one is measured. gzip: one buffer fill, so damage loses at most that
    size = max(1, min(GZIP_BUFFER if src.path.name.endswith(".gz") else BLOCK_BYTES, cap))
    reader, raw = src.open()
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
            progress(src.size - last_pos)
        reader.close()
        raw.close()
