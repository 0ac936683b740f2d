"""The masking protocol of one round (Bonawitz et al., CCS 2017, with signatures: its "active" variant).

Every member site ``u`` of the roster runs one :class:`SiteRound` through the five ``PHASES``:

1. ``advertise``: two fresh X25519 key pairs for this round only (``c`` encrypts the shares, ``s``
   agrees the pairwise masks), signed by the site's Ed25519 key. U1 = the sites whose keys verify.
2. ``shares``: a random 16-byte self-mask seed ``b_u`` and the 16-byte seed the ``s`` key is derived
   from (HKDF) are Shamir-shared ``t``-of-|U1| (pycryptodome's ``Shamir`` over GF(2^128)),
   each share encrypted to its holder (ChaCha20-Poly1305 under HKDF of the ``c`` agreement), with a
   hash commitment to ``b_u``. U2 = the sites whose shares verify and list the same U1.
3. ``masked``: ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv)`` in Z_{2^64}, where
   ``s_uv`` is HKDF of the X25519 agreement of ``s_u`` and ``s_v`` and PRG is the ChaCha20 keystream
   (``u < v`` adds, ``u > v`` subtracts, so each pair cancels in the sum). U3 = the contributors.
4. ``consistency``: each contributor signs the set U3 it saw. A site goes on only when at least ``t``
   contributors signed exactly its own U3, so no two honest sites act on different contributor sets.
5. ``reveal``: for each ``v`` in U3 the share of ``b_v`` (to remove its self mask); for each ``v`` in
   U2 \\ U3 (dropped after sharing) the share of ``s_v`` (to remove the pairwise masks the others
   added for it). Never both for one site: a site wrongly believed dropped has its vector still
   masked by ``b_v``, whose shares no honest site reveals.

Anyone holding the five phases' messages (every member) then computes ``sum_{u in U3} x_u`` with
:func:`unmask`. Threshold ``t = max(m, floor(2n/3) + 1)`` for ``n = |U1|``: at least ``m`` (the
manifest's ``min_sites``), and more than (n + c) / 2 for any c < n/3 colluding sites, so a board that
shows different sites different contributor sets (a DHT node can withhold a message from some readers)
cannot gather ``t`` signatures for two sets, nor ``t`` shares of both secrets of one site
(``docs/secagg.md``). Only per-round secrets are ever revealed; the Ed25519 site key only signs.

One contribution per site per round: the site's :class:`RoundJournal` (a file per round, created with
``O_EXCL`` before the first message) refuses a second start of the same round in any process, and the
board refuses a second, different message for a phase.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qis_fhir.errors import RoundRepeatedError, SecAggAbortedError
from qis_fhir.files import atomic_write
from qis_fhir.packets.keys import b64, unb64
from qis_fhir.secagg.round import PHASES, Board, RoundRef

SIGNATURE_BYTES = 64
KEY_BYTES = 32
SEED_BYTES = 16  # the self-mask seed: one Shamir secret (GF(2^128))
#: how many t-subsets of the revealed shares unmasking tries before it gives up on a secret whose
#: reconstruction does not match its commitment (a revealer sending a wrong share): C(t+2, t) covers
#: two bad shares among t + 2 for t up to 50
MAX_SUBSETS = 1500


def threshold(n: int, min_sites: int) -> int:
    """Shares needed to rebuild a secret, for a round with ``n`` sites in U1 (module docstring)."""
    return max(min_sites, (2 * n) // 3 + 1)


@dataclass(frozen=True)
class Roster:
    """Who may take part: site id -> the Ed25519 public keys (32 raw bytes) its messages may be signed
    with (a site has more than one while it rotates its key), and ``min_sites`` (m)."""

    keys: Mapping[str, tuple[bytes, ...]]
    min_sites: int

    @classmethod
    def from_manifest(cls, manifest) -> Roster:
        """The manifest's sites and their unrevoked keys; m is the manifest policy's ``min_sites``."""
        manifest.require_format(2, "secure aggregation")
        keys: dict[str, list[bytes]] = {}
        for s in manifest.sites:
            if s.key_id not in manifest.revoked_key_ids:
                keys.setdefault(s.site_id, []).append(s.public_key)
        return cls({sid: tuple(k) for sid, k in sorted(keys.items())}, manifest.min_sites)

    def verify(self, site_id: str, message: bytes, signature: bytes) -> bool:
        for raw in self.keys.get(site_id, ()):
            try:
                Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
                return True
            except InvalidSignature:
                continue
        return False


# ---------------------------------------------------------------------------------------------
# primitives: every one is a maintained library's; these only fix labels and encodings


def _hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^64}: the ChaCha20 keystream under a 32-byte key (nonce 0:
    every key is derived for one round, one purpose and one pair, and used once)."""
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _pub_x25519(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _signed_bytes(label: bytes, phase: str, site_id: str, payload: bytes) -> bytes:
    return b"qis-fhir/secagg/message/v1\n" + label + b"\n" + phase.encode() + b"\n" + site_id.encode() + b"\n" + payload


def seal(ref: RoundRef, phase: str, site_id: str, key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """A phase message: payload then the site's Ed25519 signature over (round, phase, site, payload)."""
    return payload + key.sign(_signed_bytes(ref.label(), phase, site_id, payload))


def opened(ref: RoundRef, roster: Roster, phase: str, messages: Mapping[str, bytes]) -> dict[str, bytes]:
    """The payloads of ``messages`` (site id -> blob) that a roster member signed for this round and
    phase; anything else (unknown site, bad signature, replay from another round) is dropped."""
    out = {}
    label = ref.label()
    for site_id, blob in messages.items():
        if site_id not in roster.keys or len(blob) < SIGNATURE_BYTES:
            continue
        payload, signature = blob[:-SIGNATURE_BYTES], blob[-SIGNATURE_BYTES:]
        if roster.verify(site_id, _signed_bytes(label, phase, site_id, payload), signature):
            out[site_id] = payload
    return out


def _pair_key(ref: RoundRef, own: X25519PrivateKey, other_public: bytes, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    return _hkdf(shared, ref.label() + b"\npair\n" + lo.encode() + b"\n" + hi.encode())


def _s_key(ref: RoundRef, site_id: str, seed: bytes) -> X25519PrivateKey:
    """The round's mask-agreement key, derived from a 16-byte seed so that one Shamir secret shares it."""
    return X25519PrivateKey.from_private_bytes(_hkdf(seed, ref.label() + b"\ns-key\n" + site_id.encode()))


def _self_key(ref: RoundRef, site_id: str, seed: bytes) -> bytes:
    return _hkdf(seed, ref.label() + b"\nself\n" + site_id.encode())


def _commitment(ref: RoundRef, site_id: str, seed: bytes) -> str:
    return hashlib.sha256(ref.label() + b"\nseed\n" + site_id.encode() + b"\n" + seed).hexdigest()


def _share_box(ref: RoundRef, own_c: X25519PrivateKey, other_c_public: bytes, sender: str, recipient: str) -> tuple[ChaCha20Poly1305, bytes]:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(other_c_public))
    key = _hkdf(shared, ref.label() + b"\nshare\n" + sender.encode() + b"\n" + recipient.encode())
    return ChaCha20Poly1305(key), ref.label() + b"\n" + sender.encode() + b"\n" + recipient.encode()


def _set_digest(sites) -> str:
    return hashlib.sha256("\n".join(sorted(sites)).encode()).hexdigest()


def _pairwise_sum(ref: RoundRef, site_id: str, s_key: X25519PrivateKey, others: Mapping[str, bytes], length: int) -> np.ndarray:
    """sum over ``others`` (site id -> its ``s`` public key) of +PRG(s_uv) (u < v) or -PRG(s_uv)."""
    total = np.zeros(length, dtype=np.uint64)
    for v, public in others.items():
        mask = prg(_pair_key(ref, s_key, public, site_id, v), length)
        total = total + mask if site_id < v else total - mask
    return total


# ---------------------------------------------------------------------------------------------
# the journal: one contribution per site per round, across processes


#: a site directory's folder of round journals (``RoundJournal``)
JOURNAL_DIR = "secagg_rounds"


class RoundJournal:
    """A site's record of the rounds it took part in: ``SITE_DIR/secagg_rounds/<digest>.json``, one per
    round.

    ``begin`` creates the round's file with ``O_CREAT | O_EXCL`` before the site's first message, so
    a second start of the same round, in this process or any other (a re-run, a retry after a crash),
    is refused: it would post fresh keys and possibly changed figures under the same round. ``note``
    records the digest of each message sent, so an operator can see how far a round went."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, ref: RoundRef, site_id: str) -> Path:
        digest = hashlib.sha256(ref.label() + b"\nsite\n" + site_id.encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def begin(self, ref: RoundRef, site_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(ref, site_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RoundRepeatedError(
                f"this site already took part in the {ref.stage} round of {ref.measure} {ref.period} "
                f"(mapping {ref.mapping_version}); a round takes one contribution per site ({path})"
            ) from None
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"round": orjson.loads(ref.label().split(b"\n", 1)[1]), "site_id": site_id, "sent": {}}))

    def note(self, ref: RoundRef, site_id: str, phase: str, blob: bytes) -> None:
        path = self.path(ref, site_id)
        record = orjson.loads(path.read_bytes())
        if phase in record["sent"]:
            raise RoundRepeatedError(f"this site already sent its {phase} message of this round")
        record["sent"][phase] = hashlib.sha256(blob).hexdigest()
        atomic_write(path, orjson.dumps(record, option=orjson.OPT_SORT_KEYS))


# ---------------------------------------------------------------------------------------------
# one site's side of a round


@dataclass
class SiteRound:
    """One site's state through one round. Call the phase methods in ``PHASES`` order, each after the
    previous phase's window closed (``run_round`` does so for tests; the Dagster steps over the DHT).

    ``vector``: this site's input, uint64 in Z_{2^64}, the round's length. ``required_contributors``:
    when given, the site reveals nothing unless the contributor set is exactly it (the value round
    requires the presence round's contributors, so its presence totals count its sites exactly)."""

    ref: RoundRef
    site_id: str
    signing_key: Ed25519PrivateKey = field(repr=False)
    roster: Roster
    vector: np.ndarray = field(repr=False)
    journal: RoundJournal | None = None
    required_contributors: frozenset[str] | None = None
    stopped: str = ""  # why this site stopped sending (run_round records a SecAggAbortedError here)
    # state, filled phase by phase
    _c: X25519PrivateKey | None = field(default=None, repr=False)
    _s: X25519PrivateKey | None = field(default=None, repr=False)
    _u1: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # site -> (c pub, s pub)
    _held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict, repr=False)  # sender -> (x, b share, s share)
    _u2: frozenset[str] = frozenset()
    _u3: frozenset[str] = frozenset()
    _seed: bytes = field(default=b"", repr=False)
    _s_seed: bytes = field(default=b"", repr=False)
    _sent: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.site_id not in self.roster.keys:
            raise SecAggAbortedError(f"site {self.site_id} is not in the network's roster")
        self.vector = np.asarray(self.vector, dtype=np.uint64)

    async def _post(self, board: Board, phase: str, payload: bytes) -> None:
        if phase in self._sent:
            raise RoundRepeatedError(f"site {self.site_id} already sent its {phase} message of this round")
        blob = seal(self.ref, phase, self.site_id, self.signing_key, payload)
        if self.journal is not None:
            if phase == PHASES[0]:
                self.journal.begin(self.ref, self.site_id)
            self.journal.note(self.ref, self.site_id, phase, blob)
        self._sent.add(phase)
        await board.post(phase, self.site_id, blob)

    async def advertise(self, board: Board) -> None:
        today = datetime.now(UTC).date().isoformat()
        if today < self.ref.opens:
            raise SecAggAbortedError(f"the round of {self.ref.measure} {self.ref.period} opens on {self.ref.opens}, when its "
                                     "figures can no longer change; a site contributes once, so it waits")
        self._s_seed = os.urandom(SEED_BYTES)
        self._c, self._s = X25519PrivateKey.generate(), _s_key(self.ref, self.site_id, self._s_seed)
        await self._post(board, "advertise", _pub_x25519(self._c) + _pub_x25519(self._s))

    async def share(self, board: Board) -> None:
        keys = opened(self.ref, self.roster, "advertise", await board.collect("advertise"))
        self._u1 = {sid: (p[:KEY_BYTES], p[KEY_BYTES:]) for sid, p in keys.items() if len(p) == 2 * KEY_BYTES}
        u1 = sorted(self._u1)
        if self._u1.get(self.site_id) != (_pub_x25519(self._c), _pub_x25519(self._s)):
            raise SecAggAbortedError(f"site {self.site_id}'s own keys are not on the board")
        t = threshold(len(u1), self.roster.min_sites)
        if len(u1) < t:
            raise SecAggAbortedError(f"only {len(u1)} sites advertised keys; the round needs {t}")
        self._seed = seed = os.urandom(SEED_BYTES)
        b_shares, s_shares = Shamir.split(t, len(u1), seed), Shamir.split(t, len(u1), self._s_seed)
        boxes = {}
        for i, v in enumerate(u1):
            x = b_shares[i][0]
            box, aad = _share_box(self.ref, self._c, self._u1[v][0], self.site_id, v)
            nonce = os.urandom(12)
            plain = x.to_bytes(2, "big") + b_shares[i][1] + s_shares[i][1]
            boxes[v] = b64(nonce + box.encrypt(nonce, plain, aad))
        payload = {"u1": u1, "t": t, "commit": _commitment(self.ref, self.site_id, seed), "shares": boxes}
        await self._post(board, "shares", orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))

    async def contribute(self, board: Board) -> None:
        t = threshold(len(self._u1), self.roster.min_sites)
        shares = _parse_shares(opened(self.ref, self.roster, "shares", await board.collect("shares")), sorted(self._u1), t)
        held = {}
        for sender, msg in shares.items():
            box, aad = _share_box(self.ref, self._c, self._u1[sender][0], sender, self.site_id)
            try:
                sealed = unb64(msg["shares"][self.site_id])
                plain = box.decrypt(sealed[:12], sealed[12:], aad)
            except (InvalidTag, ValueError):
                raise SecAggAbortedError(f"the share {sender} sent this site does not decrypt: the round stops here") from None
            held[sender] = (int.from_bytes(plain[:2], "big"), plain[2:18], plain[18:34])
        self._held = held
        self._u2 = frozenset(shares)
        if self.site_id not in self._u2 or len(self._u2) < t:
            raise SecAggAbortedError(f"only {len(self._u2)} sites shared their secrets; too few to go on")
        length = len(self.vector)
        others = {v: self._u1[v][1] for v in self._u2 if v != self.site_id}
        y = self.vector + prg(_self_key(self.ref, self.site_id, self._seed), length) + _pairwise_sum(self.ref, self.site_id, self._s, others, length)
        await self._post(board, "masked", bytes.fromhex(_set_digest(self._u2)) + y.astype("<u8").tobytes())

    async def confirm(self, board: Board) -> None:
        masked = opened(self.ref, self.roster, "masked", await board.collect("masked"))
        digest = bytes.fromhex(_set_digest(self._u2))
        length = 32 + 8 * len(self.vector)
        u3 = {v for v, p in masked.items() if v in self._u2 and len(p) == length}
        if any(masked[v][:32] != digest for v in u3):
            raise SecAggAbortedError("contributors masked against different sets of sites: nothing is revealed")
        self._u3 = frozenset(u3)
        self._check_contributors(self._u3)
        await self._post(board, "consistency", orjson.dumps(sorted(self._u3)))

    def _check_contributors(self, u3: frozenset[str]) -> None:
        t = threshold(len(self._u1), self.roster.min_sites)
        if self.site_id not in u3:
            raise SecAggAbortedError(f"site {self.site_id}'s own masked vector is not among the contributions")
        if len(u3) < t:
            raise SecAggAbortedError(f"only {len(u3)} sites contributed; the round needs {t} to unmask")
        if self.required_contributors is not None and u3 != self.required_contributors:
            raise SecAggAbortedError("the contributors are not the sites this round requires (the presence round's): nothing is revealed")

    async def reveal(self, board: Board) -> None:
        signed = opened(self.ref, self.roster, "consistency", await board.collect("consistency"))
        mine = orjson.dumps(sorted(self._u3))
        agree = {v for v, p in signed.items() if v in self._u3 and p == mine}
        if len(agree) < threshold(len(self._u1), self.roster.min_sites):
            raise SecAggAbortedError(f"only {len(agree)} contributors signed this site's contributor set; nothing is revealed")
        b_part = {v: [self._held[v][0], b64(self._held[v][1])] for v in sorted(self._u3)}
        s_part = {v: [self._held[v][0], b64(self._held[v][2])] for v in sorted(self._u2 - self._u3)}
        assert not set(b_part) & set(s_part)  # disjoint by construction: U3 and U2 \ U3
        await self._post(board, "reveal", orjson.dumps({"b": b_part, "s": s_part}, option=orjson.OPT_SORT_KEYS))


def _parse_shares(messages: Mapping[str, bytes], u1: Sequence[str], t: int) -> dict[str, dict]:
    """The well-formed shares messages that list the same U1 as the reader and its threshold ``t``."""
    out = {}
    for sender, payload in messages.items():
        try:
            msg = orjson.loads(payload)
            ok = (msg["u1"] == list(u1) and sender in u1 and msg["t"] == t and isinstance(msg["commit"], str)
                  and isinstance(msg["shares"], dict) and set(msg["shares"]) == set(u1)
                  and all(isinstance(b, str) for b in msg["shares"].values()))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
        if ok:
            out[sender] = msg
    return out


# ---------------------------------------------------------------------------------------------
# unmasking: what any member computes from the board


@dataclass(frozen=True)
class RoundResult:
    totals: np.ndarray  # uint64, sum over ``contributors`` of their vectors in Z_{2^64}
    contributors: frozenset[str]  # U3: the sites whose vectors are in the totals
    dropped: frozenset[str]  # U2 \ U3: shared their secrets, then did not contribute


def _rebuild(pieces: list[tuple[int, bytes]], t: int, check) -> bytes:
    """The secret ``t`` of ``pieces`` rebuild that passes ``check`` (its commitment), trying t-subsets
    (up to ``MAX_SUBSETS``) so a few wrong shares from a dishonest revealer cannot block the round."""
    if len(pieces) < t:
        raise SecAggAbortedError(f"only {len(pieces)} shares of a secret were revealed; {t} are needed")
    for subset in itertools.islice(itertools.combinations(sorted(pieces), t), MAX_SUBSETS):
        secret = Shamir.combine(list(subset))
        if check(secret):
            return secret
    raise SecAggAbortedError("the revealed shares do not rebuild a committed secret: a revealer sent wrong shares")


def _revealed(reveals: Mapping[str, dict], revealers: frozenset[str], kind: str, of: str) -> list[tuple[int, bytes]]:
    """The well-formed shares of ``of``'s secret ``kind`` ("b" or "s") that ``revealers`` revealed."""
    out = []
    for site, r in reveals.items():
        try:
            x, share = r[kind][of]
            share = unb64(share)
        except (KeyError, TypeError, ValueError):
            continue  # not revealed by this site, or malformed: the subset search needs only t good ones
        if site in revealers and type(x) is int and 1 <= x and len(share) == SEED_BYTES:
            out.append((x, share))
    return out


async def unmask(ref: RoundRef, roster: Roster, board: Board, length: int) -> RoundResult:
    """``sum_{u in U3} x_u`` in Z_{2^64} from the board's five phases (module docstring, step 5)."""
    msgs = {phase: opened(ref, roster, phase, await board.collect(phase)) for phase in PHASES}
    u1_keys = {sid: (p[:KEY_BYTES], p[KEY_BYTES:]) for sid, p in msgs["advertise"].items() if len(p) == 2 * KEY_BYTES}
    t = threshold(len(u1_keys), roster.min_sites)
    shares = _parse_shares(msgs["shares"], sorted(u1_keys), t)
    u2 = frozenset(shares)
    sets: dict[frozenset[str], set[str]] = {}
    for signer, payload in msgs["consistency"].items():
        try:
            signed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(signed, list) and all(isinstance(x, str) for x in signed):
            sets.setdefault(frozenset(signed), set()).add(signer)
    agreed = [u3 for u3, signers in sets.items() if len(signers & u3) >= t]
    if len(agreed) != 1:
        raise SecAggAbortedError(f"no contributor set was signed by {t} of its contributors: the round did not complete")
    u3 = agreed[0]
    if not u3 <= u2:
        raise SecAggAbortedError("the signed contributor set names sites that did not share their secrets")
    reveals = {}
    for site, payload in msgs["reveal"].items():
        try:
            reveals[site] = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
    total = np.zeros(length, dtype=np.uint64)
    for u in sorted(u3):
        payload = msgs["masked"].get(u, b"")
        if len(payload) != 32 + 8 * length:
            raise SecAggAbortedError(f"the masked vector of contributor {u} is missing or of the wrong length")
        total = total + np.frombuffer(payload[32:], dtype="<u8").astype(np.uint64)
    for u in sorted(u3):
        commit = shares[u]["commit"]
        seed = _rebuild(_revealed(reveals, u3, "b", u), t, lambda sd, u=u, c=commit: _commitment(ref, u, sd) == c)
        total = total - prg(_self_key(ref, u, seed), length)
    for v in sorted(u2 - u3):
        public = u1_keys[v][1]
        s_seed = _rebuild(_revealed(reveals, u3, "s", v), t, lambda sd, v=v, p=public: _pub_x25519(_s_key(ref, v, sd)) == p)
        # each contributor u added +-PRG(s_uv) for v; v's own pairwise sum over them has the opposite signs
        total = total + _pairwise_sum(ref, v, _s_key(ref, v, s_seed), {u: u1_keys[u][1] for u in u3}, length)
    return RoundResult(total, u3, u2 - u3)

