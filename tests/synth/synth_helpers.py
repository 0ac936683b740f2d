"""Read a synthetic export back with nothing but orjson and gzip (independent of the generator)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import orjson


def iter_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for line in fh:
            yield line.rstrip(b"\n")


def read_type(export_dir: Path, resource_type: str) -> Iterator[dict]:
    for path in sorted(export_dir.glob(f"{resource_type}.*.ndjson*")):
        for line in iter_lines(path):
            yield orjson.loads(line)
