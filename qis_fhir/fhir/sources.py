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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BULK_NAME = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})(?:[._-](?P<part>\d{1,6}))?\.ndjson(?:\.gz)?$")
READ_BUFFER = 1 << 20
# gzip: a damaged stream fails a whole buffer fill, so a smaller buffer loses fewer readable lines
GZIP_BUFFER = 1 << 16


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
