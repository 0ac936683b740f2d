"""What a nightly export folder holds before anything reads it: files, bytes, resource types, completion.

One rule for "is this export finished", used by the new-export sensor (which waits for it before
requesting a partition) and by the export's observation in Dagster (which shows it): a folder with
files none of which changed in the last ``QUIET_SECONDS`` is complete. Bulk-export clients do not
agree on a completion marker; the one the FHIR Bulk Data spec defines, the ``$export`` manifest
(a JSON object with ``output`` and ``transactionTime``) that some clients save beside the data, is
reported as ``bulk_manifest`` when present. Nothing here names a patient: files are counted by the
resource type their bulk-export name announces (``Observation.000.ndjson``), every other name is
only counted, and the data version is a hash over names, sizes and modification times.

Bounded: at most ``max_entries`` directory entries are looked at; a manifest candidate is read only
up to ``MANIFEST_MAX_BYTES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

QUIET_SECONDS = 300  # a folder whose newest file changed more recently is still being written
MAX_ENTRIES = 10_000  # directory entries looked at per folder
MANIFEST_MAX_BYTES = 1 << 20  # a $export manifest lists file URLs: kilobytes, not megabytes

MISSING, EMPTY, WRITING, COMPLETE = "missing", "empty", "being_written", "complete"


@dataclass(frozen=True)
class ExportState:
    """One export folder as seen at ``seen_at`` (epoch seconds)."""

    completion: str  # MISSING, EMPTY (no file yet), WRITING (a file changed within quiet_seconds), COMPLETE
    files: int = 0
    bytes: int = 0
    files_by_type: dict[str, int] = field(default_factory=dict)  # resource type -> files; "other" for any other name
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    newest_change: float | None = None  # epoch seconds of the newest file's mtime
    bulk_manifest: bool = False
    version: str = ""  # sha256 over (name, size, mtime_ns) of every file: changes when any file does
    truncated: bool = False  # more than max_entries entries: the figures cover the first max_entries

    @property
    def complete(self) -> bool:
        return self.completion == COMPLETE


def newest_change(folder: Path, max_entries: int = MAX_ENTRIES) -> float | None:
    """The newest modification time of a file directly in ``folder`` (None: no file), cheaply: no
    file is opened. The sensor's per-tick check of every candidate folder."""
    newest: float | None = None
    with os.scandir(folder) as it:
        for i, entry in enumerate(it):
            if i >= max_entries:
                break
            if entry.is_file():
                m = entry.stat().st_mtime
                newest = m if newest is None else max(newest, m)
    return newest


def completion(newest: float | None, now: float, quiet_seconds: float = QUIET_SECONDS) -> str:
    """The completion rule: no file yet, still being written, or quiet long enough to read."""
    if newest is None:
        return EMPTY
    return WRITING if now - newest < quiet_seconds else COMPLETE


def inspect_export(folder: Path | str, *, now: float | None = None, quiet_seconds: float = QUIET_SECONDS,
                   max_entries: int = MAX_ENTRIES) -> ExportState:
    """Files, sizes, resource types and completion of the export in ``folder`` (files directly in it)."""
    from qis_fhir.fhir.sources import bulk_type

    folder = Path(folder)
    now = time.time() if now is None else now
    if not folder.is_dir():
        return ExportState(MISSING)
    files: Counter = Counter()
    sizes: Counter = Counter()
    digest = hashlib.sha256()
    newest: float | None = None
    manifest = truncated = False
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    if len(entries) > max_entries:
        entries, truncated = entries[:max_entries], True
    for entry in entries:
        if not entry.is_file() or entry.name.startswith("."):
            continue
        st = entry.stat()
        kind = (bulk_type(entry.name) if entry.name.endswith((".ndjson", ".ndjson.gz")) else None) or "other"
        files[kind] += 1
        sizes[kind] += st.st_size
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
        manifest = manifest or (entry.name.endswith(".json") and st.st_size <= MANIFEST_MAX_BYTES and _is_bulk_manifest(Path(entry.path)))
    return ExportState(
        completion=completion(newest, now, quiet_seconds),
        files=sum(files.values()),
        bytes=sum(sizes.values()),
        files_by_type=dict(sorted(files.items())),
        bytes_by_type=dict(sorted(sizes.items())),
        newest_change=newest,
        bulk_manifest=manifest,
        version=digest.hexdigest(),
        truncated=truncated,
    )


def _is_bulk_manifest(path: Path) -> bool:
    """A ``$export`` completion manifest: a JSON object with ``output`` and ``transactionTime``, no ``resourceType``."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"output", "transactionTime"} <= data.keys() and "resourceType" not in data
