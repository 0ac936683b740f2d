"""Writing files that other processes read while they change."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename): readers see the old
    file or the new one, never half of one. Used for manifests, pins, packet files and node state;
    ``mode`` 0o600 for a site's own secrets (a round's state), which exist with that mode from the start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """Indented, key-sorted JSON (the run's summaries and reports, the manifest pin file), written atomically."""
    atomic_write(Path(path), (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))
