"""Secure-aggregation round messages on the DHT: sealed chunks, the phase schedule, the node's rules.

A site's message for one phase of one round (``qis_fhir.secagg.round``: opaque bytes, up to tens of
KB for a masked vector of 1,000 cells) travels as *chunks*, each one wire of at most 512 bytes, so the
transport's caps, batching, paging and replication stay those of outcome packets:

``MAGIC(4) | tag(16) | key id(16) | opens(10, YYYY-MM-DD) | phase(1) | index(2) | count(2) |
length(4) | digest(32) | ciphertext(piece + 16) | signature(64)``

* ``tag``: ``RoundRef.tag(network secret)``, 16 opaque bytes: a node learns neither the measure nor
  the period. ``opens`` is in clear (and signed) because the node enforces the schedule from it.
* ``digest``: HMAC-SHA256 of (key id, phase, message) under a key derived from the network secret and
  the round label: equal for every chunk of one message, different for any other message, and no
  guess of a message can be tested against it without the secret.
* ``ciphertext``: ChaCha20-Poly1305 of this chunk's piece of the message, under a key derived (HKDF-
  SHA256) from the network secret and the round label, the header as associated data, and a nonce
  derived from the header (unique per (round, site, phase, message, index); the same nonce only ever
  encrypts the same piece of the same message). A node sees sizes and timing, nothing else.
* ``signature``: Ed25519 by the site's key over ``SIGN_DOMAIN + everything before it``.

One wire form: every length follows from ``length`` (pieces of ``PIECE`` bytes, the last one shorter),
the date is canonical, ``index < count``; the size is checked before anything is parsed.

A chunk is stored like a packet: under ``dht_key(tag hex + key id)`` (one DHT key per (round, site)),
as row ``r/TAG/PHASE/INDEX`` of its signing site, so the node's storage, replication, paging and
per-site quota apply unchanged. :class:`RoundGate` is the node's verify: chunks are checked here
(size, strict form, membership, revocation, signature, phase window, one message per phase), anything
else goes to the packet verifier.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from qis_fhir.dht.keys import dht_key
from qis_fhir.packets.model import MAX_WIRE_BYTES
from qis_fhir.packets.verifier import Verdict
from qis_fhir.secagg.round import DAY, PHASES, SCHEDULE, RoundRef, Schedule

MAGIC = b"QSR1"
SIGN_DOMAIN = b"qis-fhir/secagg/chunk/v1\n"
KDF_INFO = b"qis-fhir/secagg/transport/v1\n"
_HEADER = struct.Struct("!4s16s16s10sBHHI32s")
HEADER_SIZE = _HEADER.size  # 87
SIG_SIZE = 64
AEAD_TAG = 16
#: plaintext bytes per chunk: what 512 bytes leave after header, AEAD tag and signature (345)
PIECE = MAX_WIRE_BYTES - HEADER_SIZE - AEAD_TAG - SIG_SIZE
#: chunks per message (353,280 bytes): bounds what one site may store per (round, phase) on a node
MAX_CHUNKS = 1024
MAX_MESSAGE = PIECE * MAX_CHUNKS

# verdict reasons of the round rules beside the packet verifier's own (LATE and EARLY: secagg.round)
EQUIVOCATION = "equivocation"  # a second, different message of one site for one phase


# ---------------------------------------------------------------------- keys of one round
@dataclass(frozen=True)
class RoundKeys:
    """What a member derives for one round from the network secret; a node has none of it."""

    tag: bytes
    aead: bytes
    digest: bytes

    @classmethod
    def derive(cls, ref: RoundRef, network_secret: bytes) -> RoundKeys:
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=KDF_INFO + ref.label()).derive(network_secret)
        return cls(ref.tag(network_secret), okm[:32], okm[32:])

    def __repr__(self) -> str:  # never print key material
        return f"RoundKeys(tag={self.tag.hex()})"


def location(tag: bytes, key_id: str) -> str:
    """The 64-hex name of one (round, site) whose SHA-1 is the chunks' DHT key (as a fingerprint's is)."""
    return tag.hex() + key_id


def message_digest(keys: RoundKeys, key_id: str, phase: str, message: bytes) -> bytes:
    return hmac.new(keys.digest, bytes.fromhex(key_id) + bytes([PHASES.index(phase)]) + message, hashlib.sha256).digest()


# ---------------------------------------------------------------------- chunk
@dataclass(frozen=True)
class Chunk:
    """One decoded chunk. ``site_id`` is filled by verification (from the manifest, by key id)."""

    tag: bytes
    key_id: str
    opens: str
    phase: str
    index: int
    count: int
    length: int
    digest: bytes
    ciphertext: bytes
    signature: bytes
    header: bytes
    site_id: str = ""
    seq: int = 1  # what the node's storage ranks rows by: a chunk never has a newer version

    @property
    def fingerprint(self) -> str:  # the storage's and protocol's name for the key's 64-hex source
        return location(self.tag, self.key_id)

    @property
    def packet_id(self) -> str:
        return f"r/{self.tag.hex()}/{self.phase}/{self.index:04d}"

    @property
    def message_id(self) -> str:
        """The node's record of which message a site sent for a phase (its ``seen`` table key)."""
        return f"r/{self.tag.hex()}/{self.phase}"


class ChunkFormatError(ValueError):
    pass


def is_chunk(wire: object) -> bool:
    return isinstance(wire, (bytes, bytearray)) and wire[:4] == MAGIC


def _piece_len(length: int, index: int) -> int:
    return min(PIECE, length - index * PIECE)


def chunk_count(length: int) -> int:
    return max(1, -(-length // PIECE))


def decode_chunk(wire: bytes) -> Chunk:
    """Parse the one wire form of a chunk; ``ChunkFormatError`` for anything else. Verifies nothing."""
    if len(wire) > MAX_WIRE_BYTES:
        raise ChunkFormatError("oversize")
    if len(wire) < HEADER_SIZE + AEAD_TAG + SIG_SIZE:
        raise ChunkFormatError("short")
    magic, tag, kid, opens_raw, phase_i, index, count, length, digest = _HEADER.unpack_from(wire)
    if magic != MAGIC or phase_i >= len(PHASES) or not 1 <= count <= MAX_CHUNKS or index >= count:
        raise ChunkFormatError("header")
    if not 1 <= length <= MAX_MESSAGE or count != chunk_count(length):
        raise ChunkFormatError("length")
    try:
        opens = opens_raw.decode("ascii")
        if date.fromisoformat(opens).isoformat() != opens:
            raise ValueError
    except ValueError:
        raise ChunkFormatError("date") from None
    if len(wire) != HEADER_SIZE + _piece_len(length, index) + AEAD_TAG + SIG_SIZE:
        raise ChunkFormatError("length")
    return Chunk(tag, kid.hex(), opens, PHASES[phase_i], index, count, length, digest,
                 wire[HEADER_SIZE:-SIG_SIZE], wire[-SIG_SIZE:], wire[:HEADER_SIZE])


def _nonce(keys: RoundKeys, header: bytes) -> bytes:
    return hmac.new(keys.digest, b"nonce\n" + header, hashlib.sha256).digest()[:12]


def seal(message: bytes, *, ref: RoundRef, keys: RoundKeys, phase: str, key_id: str, sign: Callable[[bytes], bytes]) -> list[bytes]:
    """One phase message of one site -> its chunk wires (each at most 512 bytes)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    if not 1 <= len(message) <= MAX_MESSAGE:
        raise ValueError(f"a round message is 1 to {MAX_MESSAGE} bytes, not {len(message)}")
    digest = message_digest(keys, key_id, phase, message)
    count = chunk_count(len(message))
    aead = ChaCha20Poly1305(keys.aead)
    wires = []
    for index in range(count):
        header = _HEADER.pack(MAGIC, keys.tag, bytes.fromhex(key_id), ref.opens.encode("ascii"), PHASES.index(phase),
                              index, count, len(message), digest)
        piece = message[index * PIECE : (index + 1) * PIECE]
        body = header + aead.encrypt(_nonce(keys, header), piece, header)
        wires.append(body + sign(SIGN_DOMAIN + body))
    return wires


# ---------------------------------------------------------------------- verification (nodes and readers)
class ChunkVerifier:
    """Membership, revocation and signature of chunks against one manifest (what a node can check)."""

    def __init__(self, manifest: Any) -> None:
        self.manifest = manifest
        self._keys = {s.key_id: (s.site_id, VerifyKey(s.public_key)) for s in manifest.sites}
        self._ok: dict[bytes, None] = {}  # signatures already verified (a node sees a chunk on every republish)

    def verify(self, wire: object) -> Verdict:
        if not isinstance(wire, (bytes, bytearray)):
            return Verdict(False, "malformed")
        if len(wire) > MAX_WIRE_BYTES:
            return Verdict(False, "oversize")
        wire = bytes(wire)
        try:
            chunk = decode_chunk(wire)
        except ChunkFormatError:
            return Verdict(False, "malformed")
        if chunk.key_id == self.manifest.governance_key_id:
            return Verdict(False, "governance_key", chunk)
        entry = self._keys.get(chunk.key_id)
        if entry is None:
            return Verdict(False, "unknown_key", chunk)
        if chunk.key_id in self.manifest.revoked_key_ids:
            return Verdict(False, "revoked_key", chunk)
        seen = hashlib.sha256(wire).digest()
        if seen not in self._ok:
            try:
                entry[1].verify(SIGN_DOMAIN + wire[:-SIG_SIZE], chunk.signature)
            except (BadSignatureError, ValueError, TypeError):
                return Verdict(False, "bad_signature", chunk)
            if len(self._ok) >= 100_000:
                self._ok.pop(next(iter(self._ok)))
            self._ok[seen] = None
        return Verdict(True, "ok", replace(chunk, site_id=entry[0]))


class RoundGate:
    """A node's verify: round chunks by the rules below, every other wire by ``packets`` (the node's
    ``ManifestVerifier``, whose manifest, reloaded when its file changes, also decides membership here).

    A new message (the first chunk of a (site, round, phase) this node sees) must arrive inside its
    phase's window (``Schedule.refusal``); the node then records its digest in the ``seen`` table, and
    refuses any chunk of that site and phase with another digest (``equivocation``). Further chunks of
    the recorded message are taken after the window too: that message was contributed in time, and
    its replicas must still reach nodes that missed some chunks. ``clock`` is injectable for tests.
    """

    def __init__(self, packets: Any, replay: Any, *, clock: Callable[[], float] = time.time, schedule: Schedule = SCHEDULE) -> None:
        self.packets = packets
        self.replay = replay
        self.clock = clock
        self.schedule = schedule
        self._chunks: ChunkVerifier | None = None

    @property
    def manifest(self) -> Any:
        return self.packets.manifest

    def refresh(self, force: bool = False) -> bool:
        """The packet verifier's manifest reload (a node's upkeep asks before it prunes sessions)."""
        return self.packets.refresh(force=force)

    def _verifier(self) -> ChunkVerifier:
        if self._chunks is None or self._chunks.manifest is not self.manifest:
            self._chunks = ChunkVerifier(self.manifest)
        return self._chunks

    def __call__(self, wire: bytes) -> Verdict:
        return self._run(wire, record=True)

    def check(self, wire: bytes) -> Verdict:
        return self._run(wire, record=False)

    def _run(self, wire: bytes, record: bool) -> Verdict:
        if not is_chunk(wire):
            return self.packets(wire) if record else self.packets.check(wire)
        refresh = getattr(self.packets, "refresh", None)
        if refresh is not None:
            refresh()
        verdict = self._verifier().verify(wire)
        if verdict.reason == "unknown_key" and refresh is not None and refresh(force=True):
            verdict = self._verifier().verify(wire)
        if not verdict.ok:
            return verdict
        chunk = verdict.packet
        held = self.replay.get_digest(chunk.site_id, chunk.message_id)
        digest = chunk.digest.hex()
        if held is not None:
            return verdict if held == digest else Verdict(False, EQUIVOCATION, chunk)
        refusal = self.schedule.refusal(chunk.phase, chunk.opens, self.clock())
        if refusal is not None:
            return Verdict(False, refusal, chunk)
        if record:
            self.replay.put(chunk.site_id, chunk.message_id, 1, digest)
        return verdict


# ---------------------------------------------------------------------- reassembly (readers)
@dataclass
class PhaseRead:
    """What a reader made of one phase: messages by site, and the sites whose chunks did not add up."""

    messages: dict[str, bytes]
    equivocated: list[str]  # two different messages (or two versions of one chunk) seen: excluded
    incomplete: list[str]  # some chunks never found: excluded
    invalid: list[str]  # chunks that do not decrypt or match their digest: excluded
    rejected: dict[str, int]  # chunk wires refused by verification, by reason

    def to_dict(self) -> dict:
        return {
            "sites": sorted(self.messages),
            "bytes": sum(len(m) for m in self.messages.values()),
            "equivocated": sorted(self.equivocated),
            "incomplete": sorted(self.incomplete),
            "invalid": sorted(self.invalid),
            "rejected": dict(sorted(self.rejected.items())),
        }


def reassemble(wires: Iterable[bytes], *, ref: RoundRef, keys: RoundKeys, phase: str, verifier: ChunkVerifier) -> PhaseRead:
    """Every site's message of ``phase`` from the chunk wires found under the round's keys.

    Each chunk is verified (form, membership, revocation, signature) and must name this round (tag and
    ``opens``) and phase; a site with two digests, or two different wires for one chunk, equivocated
    and is excluded, as is a site whose chunks are incomplete or fail decryption or the digest.
    """
    rejected: dict[str, int] = {}
    by_site: dict[str, dict[bytes, dict[int, set[Chunk]]]] = {}
    for wire in set(wires):
        verdict = verifier.verify(wire)
        chunk = verdict.packet
        if verdict.ok and (chunk.tag != keys.tag or chunk.opens != ref.opens):
            verdict = Verdict(False, "other_round", chunk)
        if not verdict.ok:
            rejected[verdict.reason] = rejected.get(verdict.reason, 0) + 1
            continue
        if chunk.phase == phase:
            by_site.setdefault(chunk.site_id, {}).setdefault(chunk.digest, {}).setdefault(chunk.index, set()).add(chunk)
    read = PhaseRead({}, [], [], [], rejected)
    aead = ChaCha20Poly1305(keys.aead)
    for site_id, digests in sorted(by_site.items()):
        if len(digests) > 1 or any(len(versions) > 1 for d in digests.values() for versions in d.values()):
            read.equivocated.append(site_id)
            continue
        (digest, pieces), = digests.items()
        chunks = [next(iter(pieces[i])) for i in sorted(pieces)]
        if sorted(pieces) != list(range(chunks[0].count)) or len({(c.count, c.length) for c in chunks}) > 1:
            read.incomplete.append(site_id)
            continue
        try:
            message = b"".join(aead.decrypt(_nonce(keys, c.header), c.ciphertext, c.header) for c in chunks)
        except InvalidTag:
            read.invalid.append(site_id)
            continue
        if len(message) != chunks[0].length or not hmac.compare_digest(message_digest(keys, chunks[0].key_id, phase, message), digest):
            read.invalid.append(site_id)
            continue
        read.messages[site_id] = message
    return read


def round_key(tag: bytes, key_id: str) -> bytes:
    """The DHT key of one (round, site)."""
    return dht_key(location(tag, key_id))


def retention(ref: RoundRef, now: float, schedule: Schedule = SCHEDULE, after: float = 7 * DAY) -> float:
    """Seconds a chunk should live from ``now``: until a week after the round's last window closes,
    so a site that unmasks late still finds every message; never less than a day."""
    return max(DAY, schedule.closes(ref.opens, PHASES[-1]) + after - now)

