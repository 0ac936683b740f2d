"""Site and network secrets: random bytes in files only the owner can read.

A secret file holds 32 random bytes, hex encoded, and is created with mode 0600 on first use.
Reading one whose mode lets group or others read it is refused: a patient-key secret that leaks
turns every pseudonymous key back into a dictionary attack on hospital ids.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from qis_fhir.errors import AlreadyExistsError, SecretError

SECRET_BYTES = 32


def write_new_file(path: Path, data: bytes, mode: int = 0o600, what: str = "it") -> None:
    """Create ``path`` holding ``data`` with ``mode``. Never overwrites: ``O_EXCL`` refuses an existing
    file even in a race with another process (``AlreadyExistsError``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} already exists; refusing to overwrite {what}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def require_owner_only(path: Path, what: str, missing: type[Exception] = SecretError) -> None:
    """Refuse a private file (secret, private key) that does not exist or that group or others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise missing(f"{what} {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{what} {path} is readable by group or others; run: chmod 600 {path}")


def read_secret(path: Path | str) -> bytes:
    """Read a secret file, refusing unsafe permissions or malformed content."""
    path = Path(path)
    require_owner_only(path, "secret file")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"secret file {path} is not hex encoded") from None
    if len(value) != SECRET_BYTES:
        raise SecretError(f"secret file {path} must hold {SECRET_BYTES} bytes, found {len(value)}")
    return value


def load_or_create_secret(path: Path | str | None) -> bytes:
    """Return the secret at ``path`` (None: ``default_site_secret_path()``), creating it (mode 0600)
    if it does not exist yet."""
    path = Path(path) if path else default_site_secret_path()
    if not path.exists():
        try:
            return create_secret(path)
        except AlreadyExistsError:  # another process created it first
            pass
    return read_secret(path)


def create_secret(path: Path | str) -> bytes:
    """Create a new secret (mode 0600), refusing to overwrite an existing file."""
    value = secrets.token_bytes(SECRET_BYTES)
    write_new_file(Path(path), value.hex().encode("ascii") + b"\n")
    return value


def qis_fhir_home() -> Path:
    """``$QIS_FHIR_HOME``, default ``~/.qis-fhir``: where the CLI keeps its default secret and pin file."""
    return Path(os.environ.get("QIS_FHIR_HOME") or Path.home() / ".qis-fhir")


def default_site_secret_path() -> Path:
    """Where a site secret lives when no site directory is given: ``$QIS_FHIR_HOME/site.secret``."""
    return qis_fhir_home() / "site.secret"
