"""NDJSON part files as a bulk-export server writes them: ``<Type>.000.ndjson``, ``.001``, ...

Lines are buffered and written in batches so memory stays flat however many lines are written.
Gzip output is byte-deterministic (no file name or timestamp in the gzip header).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO

_BATCH = 2048


class PartWriter:
    """Writes one resource type's lines, starting a new part file every ``max_lines`` lines."""

    def __init__(self, out_dir: Path, resource_type: str, max_lines: int, gzip_output: bool = False,
                 compresslevel: int = 6) -> None:
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self.out_dir = out_dir
        self.resource_type = resource_type
        self.max_lines = max_lines
        self.gzip_output = gzip_output
        self.compresslevel = compresslevel
        self.lines = 0
        self.parts: list[Path] = []
        self._in_part = 0
        self._raw: BinaryIO | None = None
        self._fh: BinaryIO | None = None
        self._buf: list[bytes] = []

    @property
    def suffix(self) -> str:
        return ".ndjson.gz" if self.gzip_output else ".ndjson"

    def _open_next(self) -> None:
        self._close_part()
        path = self.out_dir / f"{self.resource_type}.{len(self.parts):03d}{self.suffix}"
        raw = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in _close_part)
        self._raw = raw
        if self.gzip_output:
            self._fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                     compresslevel=self.compresslevel)
        else:
            self._fh = raw
        self.parts.append(path)
        self._in_part = 0

    def _flush(self) -> None:
        if self._buf:
            assert self._fh is not None
            self._fh.write(b"".join(self._buf))
            self._buf.clear()

    def _close_part(self) -> None:
        self._flush()
        if self._fh is not None:
            self._fh.close()
            if self._raw is not self._fh and self._raw is not None:
                self._raw.close()
        self._fh = None
        self._raw = None

    def write(self, line: bytes) -> None:
        """Append one resource line (without the trailing newline)."""
        if self._fh is None or self._in_part >= self.max_lines:
            self._open_next()  # flushes and closes the current part first
        self._buf.append(line + b"\n")
        self._in_part += 1
        self.lines += 1
        if len(self._buf) >= _BATCH:
            self._flush()

    def close(self) -> None:
        self._close_part()


class ExportWriter:
    """One ``PartWriter`` per resource type, created on first use."""

    def __init__(self, out_dir: Path, max_lines: int, gzip_output: bool = False) -> None:
        self.out_dir = out_dir
        self.max_lines = max_lines
        self.gzip_output = gzip_output
        self.writers: dict[str, PartWriter] = {}

    def writer(self, resource_type: str) -> PartWriter:
        w = self.writers.get(resource_type)
        if w is None:
            w = PartWriter(self.out_dir, resource_type, self.max_lines, self.gzip_output)
            self.writers[resource_type] = w
        return w

    def counts(self) -> dict[str, int]:
        return {k: w.lines for k, w in sorted(self.writers.items())}

    def files(self) -> list[Path]:
        return sorted(p for w in self.writers.values() for p in w.parts)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


__all__ = ["ExportWriter", "PartWriter"]
