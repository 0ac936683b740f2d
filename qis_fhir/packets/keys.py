"""Ed25519 keys and site identities.

A site directory (``qis-fhir keys new --site-id ID --out SITE_DIR``) holds:

| file | mode | leaves the site? |
| --- | --- | --- |
| ``site_key.pem`` | 0600 | never: the site's Ed25519 signing key (PKCS#8 PEM) |
| ``site_key.pub`` | 0644 | yes, to the network governance (SubjectPublicKeyInfo PEM) |
| ``site.secret`` | 0600 | never: the secret that turns patient ids into pseudonymous keys |
| ``site.json`` | 0644 | yes: site id, key id and public key, read by ``network add-site`` |
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qis_fhir.errors import AlreadyExistsError, InputNotFoundError, SecretError
from qis_fhir.packets.model import SITE_ID_RE
from qis_fhir.privacy.secrets import create_secret, read_secret, require_owner_only, write_new_file

SITE_KEY = "site_key.pem"
SITE_PUB = "site_key.pub"
SITE_SECRET = "site.secret"
SITE_JSON = "site.json"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public_raw: bytes) -> str:
    """32-hex id of a public key: the first 128 bits of SHA-256 over its 32 raw bytes."""
    return hashlib.sha256(b"qis-fhir/key/v1\n" + public_raw).hexdigest()[:32]


def b64(data: bytes) -> str:
    """Standard padded base64 of the key files: ``site.json`` and ``manifest.json`` (packets use the
    codec's unpadded base64url)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a PKCS#8 PEM with mode 0600, refusing to overwrite (``O_EXCL``: also safe against races)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_new_file(path, pem, 0o600, what="a private key")


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, refusing a file that group or others can read."""
    path = Path(path)
    require_owner_only(path, "private key", missing=InputNotFoundError)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise SecretError(f"private key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecretError(f"private key {path} is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class SiteIdentity:
    """What the packet stage needs of a site: who it is, its signing key and its patient-key secret."""

    site_id: str
    key_id: str
    private_key: Ed25519PrivateKey
    public_key: bytes  # 32 raw bytes
    patient_secret: bytes
    site_dir: Path

    def __repr__(self) -> str:  # never print key material
        return f"SiteIdentity(site_id={self.site_id!r}, key_id={self.key_id!r}, site_dir={str(self.site_dir)!r})"


def validate_site_id(site_id: str) -> str:
    if not isinstance(site_id, str) or not SITE_ID_RE.fullmatch(site_id):
        raise ValueError(
            "site id must be 1-48 characters of lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return site_id


def create_site(site_id: str, site_dir: Path | str) -> SiteIdentity:
    """Create a site's key pair, patient-key secret and ``site.json``; refuses to overwrite any of them."""
    validate_site_id(site_id)
    site_dir = Path(site_dir)
    for name in (SITE_KEY, SITE_PUB, SITE_SECRET, SITE_JSON):
        if (site_dir / name).exists():
            raise AlreadyExistsError(f"{site_dir / name} already exists; refusing to overwrite a site identity")
    site_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_private_key(site_dir / SITE_KEY, key)
    pub = key.public_key()
    raw = raw_public(pub)
    kid = key_id_of(raw)
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_new_file(site_dir / SITE_PUB, pem, 0o644)
    secret = create_secret(site_dir / SITE_SECRET)
    info = {
        "site_id": site_id,
        "key_id": kid,
        "public_key": b64(raw),
        "created": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    write_new_file(site_dir / SITE_JSON, orjson.dumps(info, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n", 0o644)
    return SiteIdentity(site_id, kid, key, raw, secret, site_dir)


def read_site_info(site_dir: Path | str) -> dict:
    """The public part of a site directory (``site.json``), checked against its public key."""
    site_dir = Path(site_dir)
    path = site_dir / SITE_JSON
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist; create the site with: qis-fhir keys new --site-id ID --out {site_dir}")
    try:
        info = orjson.loads(path.read_bytes())
        site_id = validate_site_id(info["site_id"])
        raw = unb64(info["public_key"])
        public_key_from_raw(raw)
        kid = info["key_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InputNotFoundError(f"{path} is not a valid site.json") from None
    if key_id_of(raw) != kid:
        raise SecretError(f"{path}: key_id does not match the public key")
    return {"site_id": site_id, "key_id": kid, "public_key": raw}


def load_site(site_dir: Path | str) -> SiteIdentity:
    """Load a site directory made by ``qis-fhir keys new``, checking the key pair belongs together."""
    site_dir = Path(site_dir)
    info = read_site_info(site_dir)
    key = read_private_key(site_dir / SITE_KEY)
    raw = raw_public(key.public_key())
    if raw != info["public_key"]:
        raise SecretError(f"{site_dir / SITE_KEY} does not match the public key in {site_dir / SITE_JSON}")
    secret = read_secret(site_dir / SITE_SECRET)
    return SiteIdentity(info["site_id"], info["key_id"], key, raw, secret, site_dir)
