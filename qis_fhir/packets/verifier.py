"""The one packet verifier: the ``verify`` command, the DHT's store hook and the evidence stage all use it.

``Verifier(manifest).verify(wire)`` never raises on bad input; it returns a ``Verdict`` whose
``reason`` is one of ``REASONS``. Checks run cheapest-first and the first failure is the reason:

1. ``oversize``       wire encoding over 512 bytes (checked before parsing anything)
2. ``malformed``      not the canonical encoding of a well-formed packet
3. ``governance_key`` signed under the governance key id: governance never speaks as a site
4. ``unknown_key``    key id not in the manifest, or registered to another site id
5. ``revoked_key``    key id revoked by the manifest
6. ``bad_signature``  Ed25519 signature does not verify under the site's key
7. ``mapping_version`` mapping version not accepted by the manifest
8. ``out_of_range``   patients under the manifest's minimum cell size, responders > patients, SD < 0;
                      version 2: ``measured`` over ``patients``, or a mean over fewer than the
                      minimum cell size (0 < measured < min, or measured 0 with a mean or SD)
9. ``replay``         seq older than one already accepted for this (site, packet id)
10. ``equivocation``  same seq as an accepted packet but different content

Accepted verdicts are ``ok`` (new, or a higher seq that supersedes the earlier one) or ``duplicate``
(identical content at the seq already accepted: a re-run or re-delivery; do not count it again).
Replay state is updated only by accepted packets, and only when ``record`` is true.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from qis_fhir.packets.codec import decode_packet, signing_bytes_from_wire
from qis_fhir.packets.manifest import NetworkManifest
from qis_fhir.packets.model import MAX_WIRE_BYTES, Packet, PacketFormatError
from qis_fhir.packets.replay import MemoryReplayState, ReplayState

ACCEPTED = ("ok", "duplicate")
REJECTED = (
    "oversize",
    "malformed",
    "governance_key",
    "unknown_key",
    "revoked_key",
    "bad_signature",
    "mapping_version",
    "out_of_range",
    "replay",
    "equivocation",
)
REASONS = ACCEPTED + REJECTED


@dataclass(frozen=True, slots=True)
class Verdict:
    """``packet`` is the decoded packet when it could be decoded; trust it only when ``ok``."""

    ok: bool
    reason: str
    packet: Packet | None = None


class Verifier:
    def __init__(self, manifest: NetworkManifest, replay: ReplayState | None = None, *, cache_size: int = 100_000) -> None:
        self.manifest = manifest
        # digests of wire bytes whose signature already verified under this manifest: a DHT node sees
        # the same packet on every republish and get, and Ed25519 verification is the dominant cost
        self._verified: dict[bytes, None] = {}
        self._cache_size = cache_size
        self.replay: ReplayState = replay if replay is not None else MemoryReplayState()
        self._get_digest = getattr(self.replay, "get_digest", None)
        self._governance_key_id = manifest.governance_key_id
        self._min_cell = manifest.min_cell_size
        self._mapping_versions = frozenset(manifest.accepted_mapping_versions)
        self._revoked = manifest.revoked_key_ids
        # parsed public keys, built once. Verification uses libsodium (PyNaCl): on this hardware it
        # verifies Ed25519 about 2x faster than cryptography's OpenSSL backend (docs/benchmarks.md);
        # signatures are plain RFC 8032 Ed25519 either way, so signing stays with cryptography.
        self._keys: dict[str, tuple[str, VerifyKey]] = {s.key_id: (s.site_id, VerifyKey(s.public_key)) for s in manifest.sites}

    def verify(self, wire: bytes, *, record: bool = True) -> Verdict:
        """Check one packet's wire bytes; never raises on bad input.

        Errors of the replay store (e.g. a broken database) do propagate: they are not the packet's
        fault and must not be counted as rejections.
        """
        try:
            screened = self._screen(wire)
        except Exception:  # noqa: BLE001 - a verifier facing the network must not crash on any input
            return Verdict(False, "malformed", None)
        if isinstance(screened, Verdict):
            return screened
        return self._check_replay(*screened, record)

    def check(self, wire: bytes) -> Verdict:
        """Like ``verify`` but leaves the replay state alone (e.g. to screen before storing)."""
        return self.verify(wire, record=False)

    def _screen(self, wire: bytes) -> Verdict | tuple[Packet, bytes]:
        """Everything that depends only on the packet and the manifest; a Verdict means rejected."""
        if isinstance(wire, str):
            wire = wire.encode("utf-8")
        if not isinstance(wire, (bytes, bytearray, memoryview)):
            return Verdict(False, "malformed", None)
        if len(wire) > MAX_WIRE_BYTES:
            return Verdict(False, "oversize", None)
        wire = bytes(wire)
        try:
            p = decode_packet(wire)
        except PacketFormatError:
            return Verdict(False, "malformed", None)
        if p.key_id == self._governance_key_id:
            return Verdict(False, "governance_key", p)
        entry = self._keys.get(p.key_id)
        if entry is None or entry[0] != p.site_id:
            return Verdict(False, "unknown_key", p)
        if p.key_id in self._revoked:
            return Verdict(False, "revoked_key", p)
        message = signing_bytes_from_wire(wire)  # == signing_bytes(p) for canonical wire (tested)
        seen_wire = hashlib.sha256(wire).digest()
        if seen_wire not in self._verified:
            try:
                entry[1].verify(message, p.signature)
            except (BadSignatureError, ValueError, TypeError):
                return Verdict(False, "bad_signature", p)
            if len(self._verified) >= self._cache_size:
                self._verified.pop(next(iter(self._verified)))  # oldest first
            self._verified[seen_wire] = None
        if p.mapping_version not in self._mapping_versions:
            return Verdict(False, "mapping_version", p)
        if p.patients < self._min_cell or p.responders > p.patients or p.sd_change < 0 or self._bad_measured(p):
            return Verdict(False, "out_of_range", p)
        return p, message

    def _bad_measured(self, p: Packet) -> bool:
        """A v2 mean and SD cover 0 patients (withheld: both 0.0) or at least the minimum cell size,
        never more than the denominator: a mean of fewer patients would come too near one patient's value."""
        m = p.measured
        if m is None:
            return False
        if m == 0:
            return p.mean_change != 0.0 or p.sd_change != 0.0
        return m > p.patients or m < self._min_cell

    def _check_replay(self, p: Packet, message: bytes, record: bool) -> Verdict:
        pid = p.packet_id
        seen = self.replay.get(p.site_id, pid)
        digest = hashlib.sha256(message).hexdigest()  # content digest: equal for a re-delivery, not for any changed field
        if seen is not None:
            if p.seq < seen:
                return Verdict(False, "replay", p)
            if p.seq == seen:
                earlier = self._get_digest(p.site_id, pid) if self._get_digest is not None else None
                if earlier is not None and earlier != digest:
                    return Verdict(False, "equivocation", p)
                return Verdict(True, "duplicate", p)
        if record:
            self.replay.put(p.site_id, pid, p.seq, digest)
        return Verdict(True, "ok", p)
