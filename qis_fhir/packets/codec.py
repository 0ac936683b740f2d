"""Canonical bytes, wire encoding and signing of packets.

Wire encoding: one compact JSON object with short keys, sorted, no spaces (orjson ``OPT_SORT_KEYS``),
UTF-8, at most ``MAX_WIRE_BYTES``. The signature is Ed25519 over ``SIGNING_DOMAIN`` followed by the
same canonical JSON without the ``sig`` key. Decoding is strict: the bytes must be exactly the
canonical encoding of the packet they decode to, so there is one and only one wire form of every
packet and a flipped byte is either malformed or changes a signed field. Version 2 (control cells) is
version 1 plus one key, ``nm`` (the patients the mean and SD cover); the version number is a signed
field, so one signing domain serves both and a v1 packet's bytes and signature are what they were.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qis_fhir.packets.model import (
    MAX_WIRE_BYTES,
    WIRE_VERSION,
    WIRE_VERSION_MEASURED,
    Packet,
    PacketFormatError,
    check_packet,
)

SIGNING_DOMAIN = b"qis-fhir/packet/v1\n"

# Python field -> wire key (short keys keep a packet far under 512 bytes; see docs/packets.md)
WIRE_KEYS: dict[str, str] = {
    "fingerprint": "fp",
    "treatment": "tx",
    "measure": "m",
    "period": "p",
    "patients": "n",
    "responders": "r",
    "mean_change": "mc",
    "sd_change": "sd",
    "mapping_version": "mv",
    "site_id": "s",
    "key_id": "k",
    "seq": "q",
    "measured": "nm",  # version 2 only
}
_V1_KEYS = frozenset(WIRE_KEYS.values()) - {"nm"} | {"v", "sig"}
_KEYS = {WIRE_VERSION: _V1_KEYS, WIRE_VERSION_MEASURED: _V1_KEYS | {"nm"}}
_OPTS = orjson.OPT_SORT_KEYS


def _unsigned_dict(p: Packet) -> dict:
    d = {
        "v": p.wire_version,
        "fp": p.fingerprint,
        "tx": p.treatment,
        "m": p.measure,
        "p": p.period,
        "n": p.patients,
        "r": p.responders,
        "mc": p.mean_change,
        "sd": p.sd_change,
        "mv": p.mapping_version,
        "s": p.site_id,
        "k": p.key_id,
        "q": p.seq,
    }
    if p.measured is not None:
        d["nm"] = p.measured
    return d


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # 86 chars -> 64 bytes; binascii refuses characters outside the alphabet once '-_' are mapped back
    return binascii.a2b_base64(text.translate(_FROM_URLSAFE) + "==", strict_mode=True)


_FROM_URLSAFE = str.maketrans("-_+/", "+/-_")  # '+' and '/' in the input become invalid characters


def signing_bytes(p: Packet) -> bytes:
    """The exact bytes the Ed25519 signature covers (every field but the signature)."""
    return SIGNING_DOMAIN + orjson.dumps(_unsigned_dict(p), option=_OPTS)


_SIG_KEY = b',"sig":"'


def signing_bytes_from_wire(wire: bytes) -> bytes:
    """``signing_bytes`` of a packet straight from its *canonical* wire bytes (as ``decode_packet``
    accepted them): the wire minus ``,"sig":"..."``. Cheaper than re-encoding on the verify path."""
    i = wire.index(_SIG_KEY)
    return SIGNING_DOMAIN + wire[:i] + wire[i + len(_SIG_KEY) + 87 :]


def encode_packet(p: Packet) -> bytes:
    """Wire encoding of a signed packet; raises ``PacketFormatError`` if a field is invalid or it is too big."""
    check_packet(p)
    return _encode_checked(p)


def _encode_checked(p: Packet) -> bytes:
    d = _unsigned_dict(p)
    d["sig"] = _b64(p.signature)
    wire = orjson.dumps(d, option=_OPTS)
    if len(wire) > MAX_WIRE_BYTES:
        raise PacketFormatError(f"packet encodes to {len(wire)} bytes, over the {MAX_WIRE_BYTES}-byte limit")
    return wire


def decode_packet(b: bytes | str) -> Packet:
    """Parse one packet from its wire encoding; raises ``PacketFormatError`` on anything malformed.

    Does not verify the signature (that needs the network manifest: see ``Verifier``).
    """
    if isinstance(b, str):
        b = b.encode("utf-8")
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise PacketFormatError("packet must be bytes")
    b = bytes(b)
    if len(b) > MAX_WIRE_BYTES:
        raise PacketFormatError(f"packet is {len(b)} bytes, over the {MAX_WIRE_BYTES}-byte limit")
    try:
        d = orjson.loads(b)
    except orjson.JSONDecodeError:
        raise PacketFormatError("packet is not valid JSON") from None
    if type(d) is not dict or type(d.get("v")) is not int or d["v"] not in _KEYS:
        raise PacketFormatError("unsupported packet version")
    if d.keys() != _KEYS[d["v"]]:
        raise PacketFormatError("packet does not have exactly the packet fields")
    sig = d["sig"]
    if type(sig) is not str or len(sig) != 86:
        raise PacketFormatError("signature is not 64 bytes in unpadded base64url")
    try:
        signature = _unb64(sig)
    except (binascii.Error, ValueError):
        raise PacketFormatError("signature is not base64url") from None
    p = Packet(d["fp"], d["tx"], d["m"], d["p"], d["n"], d["r"], d["mc"], d["sd"], d["mv"], d["s"], d["k"], d["q"], signature,
               d.get("nm"))
    if p.wire_version != d["v"]:  # "nm":null would otherwise read as a version-1 packet in a v2 frame
        raise PacketFormatError("field measured must be an integer in a version 2 packet")
    check_packet(p)
    # one wire form per packet: anything else (spacing, key order, 1e2 for 100.0, base64 slack) is refused
    # (equivalent to encode_packet(p) != b, without rebuilding the dict: p's fields are d's values)
    if orjson.dumps(d, option=_OPTS) != b or _b64(signature) != sig:
        raise PacketFormatError("packet is not in canonical encoding")
    return p


# bytes the signature adds to the unsigned canonical JSON: ``"sig":"<86 chars>",`` (sorted keys put it
# between "sd" and "tx", so it always carries a trailing comma)
_SIG_WIRE_BYTES = len(b'"sig":"",') + 86


def sign_packet(p: Packet, private_key: Ed25519PrivateKey) -> Packet:
    """Return ``p`` with its signature set (over every other field, including key id and seq).

    Ed25519 signatures are deterministic, so the same fields always give the same wire bytes.
    Raises ``PacketFormatError`` if a field is invalid or the signed packet would exceed 512 bytes.
    """
    check_packet(p, signed=False)
    message = signing_bytes(p)
    size = len(message) - len(SIGNING_DOMAIN) + _SIG_WIRE_BYTES  # == len(encode_packet(signed)), tested
    if size > MAX_WIRE_BYTES:
        raise PacketFormatError(f"packet would encode to {size} bytes, over the {MAX_WIRE_BYTES}-byte limit")
    return dataclasses.replace(p, signature=private_key.sign(message))


class PacketSigner:
    """Signs packets as one site: ``PacketSigner(key, site_id, key_id).sign(fingerprint=..., ..., seq=...)``."""

    def __init__(self, private_key: Ed25519PrivateKey, site_id: str, key_id: str) -> None:
        self._key = private_key
        self.site_id = site_id
        self.key_id = key_id

    def sign(
        self,
        *,
        fingerprint: str,
        treatment: str,
        measure: str,
        period: str,
        patients: int,
        responders: int,
        mean_change: float,
        sd_change: float,
        mapping_version: str,
        seq: int,
        measured: int | None = None,
    ) -> Packet:
        p = Packet(
            fingerprint=fingerprint,
            treatment=treatment,
            measure=measure,
            period=period,
            patients=patients,
            responders=responders,
            mean_change=mean_change,
            sd_change=sd_change,
            mapping_version=mapping_version,
            site_id=self.site_id,
            key_id=self.key_id,
            seq=seq,
            measured=measured,
        )
        return sign_packet(p, self._key)
