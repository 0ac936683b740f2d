"""Node certificates: which DHT nodes belong to the network, and where they sit in the id space.

A member site issues a certificate for one node's Ed25519 key at an index below the manifest's
``max_nodes_per_site``; it is signed with the site key under its own domain, names the network and
expires. The node's Kademlia id is ``SHA-1(domain || site key id || index)``: it depends only on the
issuing site and the index, never on a key the node holds, so a node cannot regenerate keys until its
id lands next to a target, and a member site owns at most ``max_nodes_per_site`` ids in all.

A certificate is 4 + len(network id) + 16 + 2 + 32 + 8 + 64 bytes (about 140), small enough to travel
inside a handshake datagram. Checking one costs an Ed25519 verification (about 57 us here), so a
:class:`CertChecker` keeps the signature results it has seen (bounded) and re-checks only what may have
changed since: the manifest's site list, revocations, the index bound and the expiry.

Files, in the node's data directory (``qis-fhir node-cert``):

| file | mode | what |
| --- | --- | --- |
| ``node_key.pem`` | 0600 | the node's Ed25519 key; never leaves the node |
| ``node_cert.json`` | 0644 | its certificate (base64) with the fields spelt out for operators |
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qis_fhir.errors import NodeCertificateError
from qis_fhir.files import write_json
from qis_fhir.packets.keys import b64, key_id_of, raw_public, read_private_key, unb64, write_private_key

CERT_DOMAIN = b"qis-fhir/dht-node-cert/v1\n"
NODE_ID_DOMAIN = b"qis-fhir/dht-node-id/v1\n"
NODE_KEY = "node_key.pem"
NODE_CERT = "node_cert.json"
DEFAULT_DAYS = 365
_FIXED = struct.Struct(">16sH32sQ")  # site key id, index, node public key, expires (unix seconds)
SIGNATURE = 64
MAX_CERT = 4 + 48 + _FIXED.size + SIGNATURE


def node_id_for(site_key_id: str, index: int) -> bytes:
    """The 20-byte Kademlia id of certificate ``index`` of the site whose key id is ``site_key_id``."""
    return hashlib.sha1(NODE_ID_DOMAIN + bytes.fromhex(site_key_id) + index.to_bytes(2, "big")).digest()


@dataclass(frozen=True)
class NodeCert:
    network_id: str
    site_key_id: str
    index: int
    node_public_key: bytes  # 32 raw bytes
    expires: int  # unix seconds
    signature: bytes = b""

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.site_key_id, self.index)

    @property
    def node_key_id(self) -> str:
        """The id ``network revoke-node`` takes: the same derivation as every other key id."""
        return key_id_of(self.node_public_key)

    def body(self) -> bytes:
        net = self.network_id.encode("ascii")
        return struct.pack(">I", len(net)) + net + _FIXED.pack(bytes.fromhex(self.site_key_id), self.index, self.node_public_key, self.expires)

    def signed_bytes(self) -> bytes:
        return CERT_DOMAIN + self.body()

    def encode(self) -> bytes:
        return self.body() + self.signature

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.node_public_key)


def decode_cert(raw: bytes) -> NodeCert:
    """Bytes -> NodeCert (structure only; :func:`check_cert` says whether it is any good)."""
    if not isinstance(raw, bytes) or not 4 + _FIXED.size + SIGNATURE <= len(raw) <= MAX_CERT:
        raise NodeCertificateError("malformed node certificate")
    (n,) = struct.unpack_from(">I", raw)
    if len(raw) != 4 + n + _FIXED.size + SIGNATURE:
        raise NodeCertificateError("malformed node certificate")
    try:
        net = raw[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError:
        raise NodeCertificateError("malformed node certificate") from None
    kid, index, pub, expires = _FIXED.unpack_from(raw, 4 + n)
    return NodeCert(net, kid.hex(), index, pub, expires, raw[4 + n + _FIXED.size :])


def issue_cert(site: Any, manifest: Any, index: int, node_public_key: bytes, *, days: float = DEFAULT_DAYS, now: float | None = None) -> NodeCert:
    """Sign certificate ``index`` for ``node_public_key`` with ``site``'s key (a ``SiteIdentity``).

    Refuses what every node would refuse anyway, with the reason: an index beyond the manifest's
    ``max_nodes_per_site``, a site the manifest does not list or revokes, a manifest of format v1."""
    manifest.require_format(2, "issuing a node certificate")
    if not isinstance(index, int) or not 0 <= index < manifest.max_nodes_per_site:
        raise NodeCertificateError(
            f"node certificate index {index} is outside 0..{manifest.max_nodes_per_site - 1}: network "
            f"{manifest.network_id} allows {manifest.max_nodes_per_site} nodes per site"
        )
    if manifest.site_for_key(site.key_id) is None:
        raise NodeCertificateError(f"site {site.site_id}'s key is not in network {manifest.network_id}'s manifest")
    if site.key_id in manifest.revoked_key_ids:
        raise NodeCertificateError(f"network {manifest.network_id} revokes site {site.site_id}'s key")
    expires = int((time.time() if now is None else now) + days * 86400)
    cert = NodeCert(manifest.network_id, site.key_id, index, bytes(node_public_key), expires)
    return NodeCert(**{**cert.__dict__, "signature": site.private_key.sign(cert.signed_bytes())})


def check_cert(cert: NodeCert, manifest: Any, *, now: float | None = None, signature_checked: bool = False) -> str | None:
    """None when ``cert`` makes its key a node of ``manifest``'s network now, else the reason."""
    if cert.network_id != manifest.network_id:
        return "wrong_network"
    site = manifest.site_for_key(cert.site_key_id)
    if site is None:
        return "unknown_site"
    if cert.site_key_id in manifest.revoked_key_ids:
        return "revoked_site"
    if cert.node_key_id in manifest.revoked_node_key_ids:
        return "revoked_node"
    if cert.index >= manifest.max_nodes_per_site:
        return "index_beyond_bound"
    if cert.expires <= (time.time() if now is None else now):
        return "expired"
    if not signature_checked:
        try:
            Ed25519PublicKey.from_public_bytes(site.public_key).verify(cert.signature, cert.signed_bytes())
        except (InvalidSignature, ValueError):
            return "bad_signature"
    return None


class CertChecker:
    """``check(raw) -> (NodeCert | None, reason)`` against the current manifest (``manifest()`` is
    called each time, so a reloaded manifest's revocations apply at once); signatures once per cert.
    ``refresh()`` (a node's ``ManifestVerifier.refresh(force=True)``) is tried once on a certificate of
    an unknown site: a site added a moment ago runs its nodes at once, as it publishes at once."""

    def __init__(self, manifest: Any, *, refresh: Callable[[], bool] | None = None, cache: int = 4096) -> None:
        self._manifest = manifest if callable(manifest) else (lambda: manifest)
        self._refresh = refresh
        self._good: OrderedDict[bytes, NodeCert] = OrderedDict()
        self._cache = cache

    @property
    def manifest(self) -> Any:
        return self._manifest()

    def check(self, raw: bytes) -> tuple[NodeCert | None, str | None]:
        try:
            cert = self._good.get(raw) or decode_cert(raw)
        except NodeCertificateError:
            return None, "malformed_cert"
        reason = check_cert(cert, self.manifest, signature_checked=raw in self._good)
        if reason == "unknown_site" and self._refresh is not None and self._refresh():
            reason = check_cert(cert, self.manifest)
        if reason is not None:
            return None, reason
        self._good[raw] = cert
        self._good.move_to_end(raw)
        while len(self._good) > self._cache:
            self._good.popitem(last=False)
        return cert, None

    def still_valid(self, cert: NodeCert) -> bool:
        """Re-check a certificate already verified (revocation or expiry since the handshake)."""
        return check_cert(cert, self.manifest, signature_checked=True) is None


@dataclass(frozen=True)
class NodeIdentity:
    """What a node proves itself with: its key and its certificate."""

    private_key: Ed25519PrivateKey
    cert: NodeCert

    @property
    def node_id(self) -> bytes:
        return self.cert.node_id

    def __repr__(self) -> str:  # never print key material
        return f"NodeIdentity(node_id={self.node_id.hex()}, site_key_id={self.cert.site_key_id}, index={self.cert.index})"


def write_node_cert(node_dir: Path | str, site: Any, manifest: Any, index: int, *, days: float = DEFAULT_DAYS) -> NodeCert:
    """``qis-fhir node-cert``: make ``node_dir/node_key.pem`` if missing, certify it, write ``node_cert.json``."""
    node_dir = Path(node_dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    key_path = node_dir / NODE_KEY
    if key_path.exists():
        key = read_private_key(key_path)
    else:
        key = Ed25519PrivateKey.generate()
        write_private_key(key_path, key)
    cert = issue_cert(site, manifest, index, raw_public(key.public_key()), days=days)
    write_json(node_dir / NODE_CERT, {
        "cert": b64(cert.encode()),
        "network_id": cert.network_id,
        "site_id": site.site_id,
        "site_key_id": cert.site_key_id,
        "index": cert.index,
        "node_id": cert.node_id.hex(),
        "node_key_id": cert.node_key_id,
        "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.expires)),
    })
    return cert


def load_identity(node_dir: Path | str, manifest: Any) -> NodeIdentity:
    """The node's key and certificate from ``node_dir``, refused with the reason when this network
    would refuse them (a node that started anyway would only ever be a client)."""
    node_dir = Path(node_dir)
    cert_path = node_dir / NODE_CERT
    if not cert_path.is_file() or not (node_dir / NODE_KEY).is_file():
        raise NodeCertificateError(
            f"{node_dir} holds no node certificate; a member site issues one with: "
            f"qis-fhir node-cert --site SITE_DIR --network MANIFEST --index I --node-dir {node_dir}"
        )
    try:
        cert = decode_cert(unb64(orjson.loads(cert_path.read_bytes())["cert"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise NodeCertificateError(f"{cert_path} is not a node certificate") from None
    key = read_private_key(node_dir / NODE_KEY)
    if raw_public(key.public_key()) != cert.node_public_key:
        raise NodeCertificateError(f"{cert_path} certifies another key than {node_dir / NODE_KEY}")
    reason = check_cert(cert, manifest)
    if reason is not None:
        raise NodeCertificateError(f"{cert_path} is refused by network {manifest.network_id}: {reason.replace('_', ' ')}")
    return NodeIdentity(key, cert)
