"""The network manifest: the signed trust registry every reader checks packets against.

``NET_DIR`` as made by ``qis-fhir network new``:

| file | mode | who holds it |
| --- | --- | --- |
| ``manifest.json`` | 0644 | every member site and every DHT node (public) |
| ``network.secret`` | 0600 | every member site, nobody else: the fingerprint key |
| ``governance_key.pem`` | 0600 | the network's governance only: never distributed |

A member receives ``manifest.json`` and ``network.secret`` in one directory; ``load_network`` reads
both from there. The manifest is signed with the governance key over canonical bytes (orjson,
sorted keys, no spaces) of its ``manifest`` object; its ``version`` only grows. A reader that keeps
a pin file (``pinned_state``) records the governance key id and the highest version it has seen per
network id and refuses an older version, a different governance key, or a different manifest
under a version it has already seen.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import secrets as _secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qis_fhir.errors import AlreadyExistsError, InputNotFoundError, ManifestError
from qis_fhir.files import atomic_write, write_json
from qis_fhir.packets.keys import (
    b64,
    key_id_of,
    raw_public,
    read_private_key,
    read_site_info,
    unb64,
    write_private_key,
)
from qis_fhir.packets.model import KEY_ID_RE, MAPPING_VERSION_RE, SITE_ID_RE
from qis_fhir.privacy.secrets import create_secret, qis_fhir_home, read_secret

MANIFEST = "manifest.json"
NETWORK_SECRET = "network.secret"
GOVERNANCE_KEY = "governance_key.pem"
PINS = "manifest_pins.json"
#: the manifest formats this release reads, by format version; new networks are written in the newest.
#: Version 2 adds the ``policy`` object (``min_cell_size``, ``min_sites``, ``max_nodes_per_site``) and
#: ``revoked_node_key_ids``: what node certificates and secure-aggregation rounds are checked against.
#: A version-1 document still verifies under its own domain (its bytes never change); ``migrate`` re-signs
#: it as version 2.
MANIFEST_FORMATS = {1: "qis-fhir/manifest/v1", 2: "qis-fhir/manifest/v2"}
MANIFEST_FORMAT_VERSION = 2
MANIFEST_FORMAT = MANIFEST_FORMATS[MANIFEST_FORMAT_VERSION]
MANIFEST_DOMAIN = f"{MANIFEST_FORMAT}\n".encode()
DEFAULT_MIN_CELL_SIZE = 11
#: m: a pooled secure-aggregation cell is only ever summed over at least this many sites with patients
#: in it. Against c colluding members m must be at least c + 2 (docs/privacy.md); 3 covers one.
DEFAULT_MIN_SITES = 3
MIN_MIN_SITES = 3
#: how many DHT node certificates one member site may issue (certificate indexes 0..max-1), so a member
#: cannot mint node ids without bound; 4 covers a site running a node per data centre with spares
DEFAULT_MAX_NODES_PER_SITE = 4
MAX_MAX_NODES_PER_SITE = 64
#: the mapping versions a new network accepts unless governance names others: every version this
#: release ships (``mappings/``). v1 stays the sites' default mapping; accepting v2 from the start lets a
#: site move to the control designs without waiting for a re-signed manifest, and packets of the two
#: versions never mix (the version is part of every fingerprint and cell)
DEFAULT_MAPPING_VERSIONS = ("v1", "v2")
NETWORK_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")
_OPTS = orjson.OPT_SORT_KEYS


@dataclass(frozen=True)
class SiteEntry:
    site_id: str
    key_id: str
    public_key: bytes  # 32 raw bytes
    added: str  # YYYY-MM-DD


@dataclass(frozen=True)
class NetworkManifest:
    network_id: str
    version: int
    min_cell_size: int
    accepted_mapping_versions: tuple[str, ...]
    sites: tuple[SiteEntry, ...]
    revoked_key_ids: frozenset[str]
    governance_public_key: bytes  # 32 raw bytes
    issued: str
    signature: bytes = b""
    format_version: int = MANIFEST_FORMAT_VERSION
    min_sites: int = DEFAULT_MIN_SITES
    max_nodes_per_site: int = DEFAULT_MAX_NODES_PER_SITE
    #: node certificate keys revoked without revoking their site (a lost or retired node)
    revoked_node_key_ids: frozenset[str] = frozenset()
    _by_key: dict[str, SiteEntry] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_key.update({s.key_id: s for s in self.sites})

    @property
    def governance_key_id(self) -> str:
        return key_id_of(self.governance_public_key)

    def site_for_key(self, key_id: str) -> SiteEntry | None:
        return self._by_key.get(key_id)

    def site_ids(self) -> list[str]:
        return sorted({s.site_id for s in self.sites})

    def require_format(self, version: int, feature: str) -> None:
        """Refuse ``feature`` under an older manifest format, saying how to migrate."""
        if self.format_version < version:
            raise ManifestError(
                f"{feature} needs a manifest of format v{version}; network {self.network_id} has format "
                f"v{self.format_version}: its governance runs `qis-fhir network migrate NET_DIR`"
            )

    def body(self) -> dict:
        body = {
            "format": MANIFEST_FORMATS[self.format_version],
            "network_id": self.network_id,
            "version": self.version,
            "issued": self.issued,
            "accepted_mapping_versions": sorted(self.accepted_mapping_versions),
            "governance": {"key_id": self.governance_key_id, "public_key": b64(self.governance_public_key)},
            "sites": [
                {"site_id": s.site_id, "key_id": s.key_id, "public_key": b64(s.public_key), "added": s.added}
                for s in sorted(self.sites, key=lambda s: (s.site_id, s.key_id))
            ],
            "revoked_key_ids": sorted(self.revoked_key_ids),
        }
        if self.format_version == 1:
            body["min_cell_size"] = self.min_cell_size
        else:
            body["policy"] = {
                "min_cell_size": self.min_cell_size,
                "min_sites": self.min_sites,
                "max_nodes_per_site": self.max_nodes_per_site,
            }
            body["revoked_node_key_ids"] = sorted(self.revoked_node_key_ids)
        return body

    def signed_bytes(self) -> bytes:
        domain = f"{MANIFEST_FORMATS[self.format_version]}\n".encode()
        return domain + orjson.dumps(self.body(), option=_OPTS)

    def digest(self) -> str:
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> bytes:
        doc = {"manifest": self.body(), "signature": b64(self.signature)}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | _OPTS) + b"\n"


def _unb64(text: object, what: str, size: int) -> bytes:
    if not isinstance(text, str):
        raise ManifestError(f"manifest {what} is not base64 text")
    try:
        raw = unb64(text)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ManifestError(f"manifest {what} is not base64") from None
    if len(raw) != size:
        raise ManifestError(f"manifest {what} must be {size} bytes")
    return raw


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


_COMMON_FIELDS = {"format", "network_id", "version", "issued", "accepted_mapping_versions", "governance", "sites", "revoked_key_ids"}
_V1_FIELDS = _COMMON_FIELDS | {"min_cell_size"}
_V2_FIELDS = _COMMON_FIELDS | {"policy", "revoked_node_key_ids"}
_POLICY_FIELDS = {"min_cell_size", "min_sites", "max_nodes_per_site"}


def _check_policy(min_cell_size: object, min_sites: object, max_nodes_per_site: object, where: str = "") -> None:
    if type(min_cell_size) is not int or not 1 <= min_cell_size <= 10**6:
        raise ManifestError(f"{where}min_cell_size must be a positive integer")
    if type(min_sites) is not int or not MIN_MIN_SITES <= min_sites <= 10**4:
        raise ManifestError(f"{where}min_sites must be an integer of at least {MIN_MIN_SITES}")
    if type(max_nodes_per_site) is not int or not 1 <= max_nodes_per_site <= MAX_MAX_NODES_PER_SITE:
        raise ManifestError(f"{where}max_nodes_per_site must be an integer from 1 to {MAX_MAX_NODES_PER_SITE}")


def _parse(doc: object, path: Path) -> NetworkManifest:
    """Structure of a manifest document -> NetworkManifest (signature not yet checked)."""
    try:
        body = doc["manifest"]  # type: ignore[index]
        signature = _unb64(doc["signature"], "signature", 64)  # type: ignore[index]
        formats = {name: v for v, name in MANIFEST_FORMATS.items()}
        if body["format"] not in formats:
            raise ManifestError(f"{path}: unsupported manifest format (this release reads {', '.join(formats)})")
        format_version = formats[body["format"]]
        expected = _V1_FIELDS if format_version == 1 else _V2_FIELDS
        if set(body) != expected:
            raise ManifestError(f"{path}: manifest fields do not match its format {body['format']}")
        network_id = body["network_id"]
        version = body["version"]
        policy = {"min_cell_size": body["min_cell_size"]} if format_version == 1 else body["policy"]
        min_cell = policy["min_cell_size"]
        min_sites = policy.get("min_sites", DEFAULT_MIN_SITES)
        max_nodes = policy.get("max_nodes_per_site", DEFAULT_MAX_NODES_PER_SITE)
        revoked_nodes = body.get("revoked_node_key_ids", [])
        _check_policy(min_cell, min_sites, max_nodes, f"{path}: ")
        if format_version == 2 and set(policy) != _POLICY_FIELDS:
            raise ManifestError(f"{path}: manifest policy must hold exactly {', '.join(sorted(_POLICY_FIELDS))}")
        if not isinstance(revoked_nodes, list) or not all(isinstance(k, str) and KEY_ID_RE.fullmatch(k) for k in revoked_nodes):
            raise ManifestError(f"{path}: bad revoked_node_key_ids")
        if not isinstance(network_id, str) or not NETWORK_ID_RE.fullmatch(network_id):
            raise ManifestError(f"{path}: bad network_id")
        if type(version) is not int or version < 1:
            raise ManifestError(f"{path}: version must be a positive integer")
        mvs = tuple(body["accepted_mapping_versions"])
        if not all(isinstance(v, str) and MAPPING_VERSION_RE.fullmatch(v) for v in mvs):
            raise ManifestError(f"{path}: bad accepted_mapping_versions")
        gov = _unb64(body["governance"]["public_key"], "governance public key", 32)
        sites = []
        for s in body["sites"]:
            raw = _unb64(s["public_key"], "site public key", 32)
            if not isinstance(s["site_id"], str) or not SITE_ID_RE.fullmatch(s["site_id"]):
                raise ManifestError(f"{path}: bad site id")
            if s["key_id"] != key_id_of(raw):
                raise ManifestError(f"{path}: a site's key_id does not match its public key")
            sites.append(SiteEntry(s["site_id"], s["key_id"], raw, str(s["added"])))
        revoked = body["revoked_key_ids"]
        if not isinstance(revoked, list) or not all(isinstance(k, str) for k in revoked):
            raise ManifestError(f"{path}: bad revoked_key_ids")
        if len({s.key_id for s in sites}) != len(sites):
            raise ManifestError(f"{path}: a key is listed twice")
        if key_id_of(gov) in {s.key_id for s in sites}:
            raise ManifestError(f"{path}: the governance key is listed as a site key")
        return NetworkManifest(
            network_id=network_id,
            version=version,
            min_cell_size=min_cell,
            accepted_mapping_versions=mvs,
            sites=tuple(sites),
            revoked_key_ids=frozenset(revoked),
            governance_public_key=gov,
            issued=str(body["issued"]),
            signature=signature,
            format_version=format_version,
            min_sites=min_sites,
            max_nodes_per_site=max_nodes,
            revoked_node_key_ids=frozenset(revoked_nodes),
        )
    except (KeyError, TypeError, AttributeError):
        raise ManifestError(f"{path}: manifest is missing fields or has fields of the wrong type") from None


def verify_manifest_signature(m: NetworkManifest) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(m.governance_public_key).verify(m.signature, m.signed_bytes())
    except (InvalidSignature, ValueError):
        raise ManifestError(f"manifest of network {m.network_id} version {m.version}: governance signature does not verify") from None


_DIGEST_RE = re.compile(r"[0-9a-f]{64}")  # NetworkManifest.digest(): sha256 hex


def _pins_error(pin_path: Path, problem: str) -> ManifestError:
    """A corrupt pin file: say which, what is wrong in general terms (never its content) and what to do."""
    return ManifestError(
        f"pin file {pin_path} {problem}. It records, per network, the governance key and the highest manifest "
        "version this reader has trusted, so no manifest is trusted until it is repaired: restore it from a "
        "backup, or confirm the network's governance key id with its governance and then delete the file "
        "to pin the current manifest afresh"
    )


def _valid_pin(pin: object) -> bool:
    if not isinstance(pin, dict) or set(pin) - {"governance_key_id", "version", "digest"}:
        return False
    key_id, version, digest = pin.get("governance_key_id"), pin.get("version"), pin.get("digest")
    return (
        isinstance(key_id, str)
        and KEY_ID_RE.fullmatch(key_id) is not None
        and type(version) is int
        and version >= 1
        and (digest is None or (isinstance(digest, str) and _DIGEST_RE.fullmatch(digest) is not None))
    )


def _read_pins(pin_path: Path) -> dict[str, dict]:
    """The pins in ``pin_path`` ({} when it does not exist); ``ManifestError`` unless every entry is well formed."""
    try:
        data = pin_path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _pins_error(pin_path, f"cannot be read ({type(exc).__name__})") from None
    try:
        pins = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _pins_error(pin_path, "is corrupt: not JSON (truncated or overwritten?)") from None
    if not isinstance(pins, dict):
        raise _pins_error(pin_path, "is corrupt: not a JSON object of network ids")
    if not all(NETWORK_ID_RE.fullmatch(k) and _valid_pin(v) for k, v in pins.items()):
        raise _pins_error(
            pin_path, "is corrupt: an entry is not a network id with governance_key_id, version and digest"
        )
    return pins


def check_and_pin(m: NetworkManifest, pin_path: Path) -> None:
    """Trust on first use: pin the governance key and the highest version seen; refuse rollbacks."""
    pins = _read_pins(pin_path)
    pin = pins.get(m.network_id)
    if pin is not None:
        if pin["governance_key_id"] != m.governance_key_id:
            raise ManifestError(
                f"manifest of network {m.network_id} is signed by governance key {m.governance_key_id}, "
                f"but {pin['governance_key_id']} was pinned in {pin_path}"
            )
        seen = pin["version"]
        if m.version < seen:
            raise ManifestError(
                f"manifest of network {m.network_id} has version {m.version}, older than version {seen} already seen "
                f"(pinned in {pin_path}): refusing a rollback"
            )
        if m.version == seen and pin.get("digest") not in (None, m.digest()):
            raise ManifestError(f"manifest of network {m.network_id} version {m.version} differs from the one already seen under that version")
        if m.version == seen:
            return
    pins[m.network_id] = {"governance_key_id": m.governance_key_id, "version": m.version, "digest": m.digest()}
    write_json(pin_path, pins)


def default_pin_path() -> Path:
    """``$QIS_FHIR_HOME/trust/manifest_pins.json`` (default home ``~/.qis-fhir``)."""
    return qis_fhir_home() / "trust" / PINS


def manifest_path_of(path: Path | str) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def load_manifest(path: Path | str, *, pinned_state: Path | None = None) -> NetworkManifest:
    """Read and verify a manifest (``manifest.json`` or the directory holding it).

    Raises ``ManifestError`` when it is malformed or its governance signature does not verify, and,
    with ``pinned_state``, when it is older than a version seen before or signed by another key.
    """
    path = manifest_path_of(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputNotFoundError(f"network manifest {path} does not exist") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ManifestError(f"{path}: manifest is not valid JSON") from None
    m = _parse(doc, path)
    verify_manifest_signature(m)
    if pinned_state is not None:
        check_and_pin(m, Path(pinned_state))
    return m


def sign_manifest(m: NetworkManifest, governance_key: Ed25519PrivateKey) -> NetworkManifest:
    if raw_public(governance_key.public_key()) != m.governance_public_key:
        raise ManifestError("the governance key does not match the manifest's governance public key")
    return replace(m, signature=governance_key.sign(m.signed_bytes()))  # signed_bytes never cover the signature


def create_network(
    out_dir: Path | str,
    *,
    network_id: str | None = None,
    min_cell_size: int = DEFAULT_MIN_CELL_SIZE,
    mapping_versions: tuple[str, ...] = DEFAULT_MAPPING_VERSIONS,
    min_sites: int = DEFAULT_MIN_SITES,
    max_nodes_per_site: int = DEFAULT_MAX_NODES_PER_SITE,
) -> NetworkManifest:
    """Make a new network in ``out_dir``: governance key, network secret and a signed manifest (version 1,
    in the newest format)."""
    out_dir = Path(out_dir)
    for name in (MANIFEST, NETWORK_SECRET, GOVERNANCE_KEY):
        if (out_dir / name).exists():
            raise AlreadyExistsError(f"{out_dir / name} already exists; refusing to overwrite a network")
    network_id = network_id or f"net-{_secrets.token_hex(6)}"
    if not NETWORK_ID_RE.fullmatch(network_id):
        raise ManifestError("network id must be 1-48 characters of lower-case letters, digits, '.', '_' or '-'")
    _check_policy(min_cell_size, min_sites, max_nodes_per_site)
    for v in mapping_versions:
        if not MAPPING_VERSION_RE.fullmatch(v):
            raise ManifestError(f"bad mapping version {v!r}")
    gov = Ed25519PrivateKey.generate()
    write_private_key(out_dir / GOVERNANCE_KEY, gov)
    create_secret(out_dir / NETWORK_SECRET)
    m = NetworkManifest(
        network_id=network_id,
        version=1,
        min_cell_size=min_cell_size,
        accepted_mapping_versions=tuple(sorted(set(mapping_versions))),
        sites=(),
        revoked_key_ids=frozenset(),
        governance_public_key=raw_public(gov.public_key()),
        issued=_today(),
        min_sites=min_sites,
        max_nodes_per_site=max_nodes_per_site,
    )
    m = sign_manifest(m, gov)
    atomic_write(out_dir / MANIFEST, m.to_json())
    return m


def _update(net_dir: Path | str, change) -> NetworkManifest:
    net_dir = Path(net_dir)
    gov = read_private_key(net_dir / GOVERNANCE_KEY)
    current = load_manifest(net_dir / MANIFEST)
    m = sign_manifest(replace(current, **change(current), version=current.version + 1, issued=_today()), gov)
    atomic_write(net_dir / MANIFEST, m.to_json())
    return m


def add_site(net_dir: Path | str, site_dir: Path | str) -> NetworkManifest:
    """Add a site's public key (from its ``site.json``) to the manifest, re-sign, version + 1."""
    info = read_site_info(site_dir)

    def change(current: NetworkManifest) -> dict:
        if info["key_id"] in current.revoked_key_ids:
            raise ManifestError(f"key {info['key_id']} was revoked; a revoked key cannot be added again")
        if current.site_for_key(info["key_id"]) is not None:
            raise AlreadyExistsError(f"key {info['key_id']} of site {info['site_id']} is already in the manifest")
        if info["key_id"] == current.governance_key_id:
            raise ManifestError("the governance key cannot be a site key")
        return {"sites": current.sites + (SiteEntry(info["site_id"], info["key_id"], info["public_key"], _today()),)}

    return _update(net_dir, change)


def revoke(net_dir: Path | str, site_id: str, *, key_id: str | None = None) -> NetworkManifest:
    """Revoke every key of ``site_id`` (or only ``key_id``); re-sign, version + 1."""

    def change(current: NetworkManifest) -> dict:
        keys = {s.key_id for s in current.sites if s.site_id == site_id and (key_id is None or s.key_id == key_id)}
        if not keys:
            raise InputNotFoundError(f"site {site_id} has no such key in the manifest")
        return {"revoked_key_ids": current.revoked_key_ids | keys}

    return _update(net_dir, change)


def accept_mapping_version(net_dir: Path | str, version: str) -> NetworkManifest:
    """Add a mapping version the network accepts; re-sign, version + 1."""
    if not MAPPING_VERSION_RE.fullmatch(version):
        raise ManifestError(f"bad mapping version {version!r}")

    def change(current: NetworkManifest) -> dict:
        return {"accepted_mapping_versions": tuple(sorted(set(current.accepted_mapping_versions) | {version}))}

    return _update(net_dir, change)


def migrate(
    net_dir: Path | str,
    *,
    min_sites: int = DEFAULT_MIN_SITES,
    max_nodes_per_site: int = DEFAULT_MAX_NODES_PER_SITE,
) -> NetworkManifest:
    """Re-sign a format-1 manifest in the newest format with the given policy (version + 1).

    Sites, keys, revocations, accepted mappings and the minimum cell size carry over unchanged, and
    the version grows, so every reader's pin accepts the migrated manifest as the next version.
    Readers of this release read both formats; an older release refuses format 2 with "unsupported
    manifest format", so members upgrade before governance migrates.
    """
    _check_policy(DEFAULT_MIN_CELL_SIZE, min_sites, max_nodes_per_site)

    def change(current: NetworkManifest) -> dict:
        if current.format_version == MANIFEST_FORMAT_VERSION:
            raise AlreadyExistsError(f"manifest of network {current.network_id} is already in format v{MANIFEST_FORMAT_VERSION}")
        return {"format_version": MANIFEST_FORMAT_VERSION, "min_sites": min_sites, "max_nodes_per_site": max_nodes_per_site}

    return _update(net_dir, change)


def revoke_node(net_dir: Path | str, node_key_id: str) -> NetworkManifest:
    """Revoke one DHT node certificate key (a lost or retired node) without revoking its site."""
    if not KEY_ID_RE.fullmatch(node_key_id):
        raise ManifestError("a node key id is 32 hex digits")

    def change(current: NetworkManifest) -> dict:
        current.require_format(2, "revoking a node certificate")
        return {"revoked_node_key_ids": current.revoked_node_key_ids | {node_key_id}}

    return _update(net_dir, change)


@dataclass(frozen=True)
class NetworkContext:
    """What a member site needs to build packets: the verified manifest and the fingerprint secret."""

    manifest: NetworkManifest
    secret: bytes
    manifest_path: Path

    def __repr__(self) -> str:  # never print the secret
        return f"NetworkContext(network_id={self.manifest.network_id!r}, version={self.manifest.version}, manifest_path={str(self.manifest_path)!r})"


def load_network(manifest_path: Path | str, *, pinned_state: Path | None = None) -> NetworkContext:
    """Load a member's view of a network: ``manifest.json`` and the ``network.secret`` beside it."""
    path = manifest_path_of(manifest_path)
    manifest = load_manifest(path, pinned_state=pinned_state)
    return NetworkContext(manifest, read_secret(path.parent / NETWORK_SECRET), path)
