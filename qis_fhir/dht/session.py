"""The authenticated wire: one handshake per pair of peers, then every datagram sealed with a session key.

Every DHT datagram is one of these (first byte = type):

| type | sender | layout | receiver's work before it can drop it |
| --- | --- | --- | --- |
| HELLO 0x51 | initiator | idx(4) e_i(32), padded to 128 bytes | one HMAC-SHA256; answers COOKIE |
| COOKIE 0x52 | responder | idx(4) cookie(16): 21 bytes, never more than the HELLO | a dict lookup |
| INIT 0x53 | initiator | idx(4) e_i(32) cookie(16), padded to 320 bytes | one HMAC, then the handshake budget |
| RESP 0x54 | responder | idx_i(4) idx_r(4) e_r(32) AEAD(cert_r, sig_r) | a dict lookup (only answers to our own INIT) |
| FIN 0x55 | initiator | idx_r(4) AEAD(cert_i or nothing, sig_i) | a dict lookup, then one AEAD open |
| DATA 0x56 | either | receiver idx(4) counter(8) AEAD(payload) | a dict lookup, the replay window, one AEAD open |

The handshake is SIGMA-I (the signed Diffie-Hellman of IKE and TLS 1.3), from maintained primitives
only (``cryptography``: X25519, Ed25519, HKDF-SHA256, ChaCha20-Poly1305): ephemeral X25519 keys on
both sides, the responder's node certificate and its signature over the transcript hash (network id,
both indexes, both ephemeral keys, its certificate), then the initiator's certificate and its
signature over the transcript with both certificates; session keys come from HKDF over the shared
secret and that transcript. A short-lived client (publish, query) has no certificate: it sends an
empty one, authenticates the node it talks to and stays anonymous, so it is answered but never routed
to, counted as a contact, asked for a receipt or handed packets. A peer without an identity never
answers a handshake.

What a flood costs: every datagram has passed the gate of ``qis_fhir.dht.limits`` before it gets
here (size, a token bucket per source address, a shared one for handshake openers from strangers:
no crypto), and no rule of that gate is repeated here (replays are this module's window). A node
does the expensive part of a handshake (an X25519 key pair and exchange, an Ed25519 signature, and
later two verifications) only for an INIT carrying a cookie it made for that source address within
the last two minutes (``HMAC(secret, address, e_i)``, stateless, as in DTLS and
WireGuard), so a spoofed source gets nothing but a 21-byte COOKIE sent to the address it forged; and
at most ``handshake_rate`` handshakes a second pass even with good cookies. Everything else that is not
a DATA datagram of a live session with a fresh counter and a valid tag is dropped after a dict lookup.
Tables are bounded: ``MAX_PENDING`` half-open handshakes, ``MAX_SESSIONS`` sessions (oldest evicted).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qis_fhir.dht.certs import CertChecker, NodeCert, NodeIdentity
from qis_fhir.dht.keys import RPC_CAP
from qis_fhir.dht.limits import TokenBucket

HELLO, COOKIE, INIT, RESP, FIN, DATA = 0x51, 0x52, 0x53, 0x54, 0x55, 0x56
HELLO_SIZE = 128
INIT_SIZE = 320
COOKIE_SIZE = 16
DOMAIN = b"qis-fhir/dht-handshake/v1\n"
SIG_RESP = b"qis-fhir/dht-handshake/responder\n"
SIG_INIT = b"qis-fhir/dht-handshake/initiator\n"
COOKIE_ROTATE = 60.0  # a cookie is good for one to two of these
MAX_PENDING = 1024  # half-open handshakes a responder keeps (each expires after PENDING_TTL)
PENDING_TTL = 10.0
MAX_SESSIONS = 8192
SESSION_IDLE = 600.0  # a session nobody used for this long is forgotten
REKEY_AFTER = 3600.0  # an initiator makes a new session after this long; the old one dies REKEY_GRACE later
REKEY_GRACE = 120.0
WINDOW = 1024  # replay window in counters (RFC 6479's size order: reordering on a busy path)
_MASK = (1 << WINDOW) - 1
_DATA_HEAD = struct.Struct(">BIQ")
_IDX = struct.Struct(">I")
AEAD_TAG = 16
MIN_DATAGRAM = 5 + COOKIE_SIZE  # a COOKIE, the shortest message
MAX_DATAGRAM = _DATA_HEAD.size + 1 + 20 + RPC_CAP + AEAD_TAG  # a sealed request or response at the RPC cap

Address = tuple[str, int]


def _hkdf(secret: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(secret)


def _sha(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def _pack_proof(cert: bytes, sig: bytes) -> bytes:
    return struct.pack(">H", len(cert)) + cert + sig


def _unpack_proof(raw: bytes) -> tuple[bytes, bytes] | None:
    if len(raw) < 2:
        return None
    (n,) = struct.unpack_from(">H", raw)
    if len(raw) != 2 + n + 64 and not (n == 0 and len(raw) == 2):
        return None
    return raw[2 : 2 + n], raw[2 + n :]


@dataclass
class Session:
    """One authenticated session; ``peer`` is the peer's certificate, None for an anonymous client."""

    my_idx: int
    peer_idx: int
    address: Address
    send_key: ChaCha20Poly1305
    recv_key: ChaCha20Poly1305
    peer: NodeCert | None
    initiator: bool
    created: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)
    sent: int = 0
    top: int = -1  # highest counter received
    mask: int = 0  # bit d: counter top - d received
    confirmed: bool = False  # the initiator has heard the responder use the session keys

    @property
    def peer_id(self) -> bytes | None:
        return None if self.peer is None else self.peer.node_id

    def fresh(self, counter: int) -> bool:
        if counter > self.top:
            return True
        d = self.top - counter
        return d < WINDOW and not (self.mask >> d) & 1

    def mark(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self.mask = ((self.mask << shift) | 1) & _MASK if shift < WINDOW else 1
            self.top = counter
        else:
            self.mask |= 1 << (self.top - counter)


@dataclass
class _Outgoing:
    idx: int
    address: Address
    expect: bytes | None
    ephemeral: X25519PrivateKey
    e_pub: bytes
    future: asyncio.Future
    session: Session | None = None


@dataclass
class _HalfOpen:
    address: Address
    i_idx: int
    th1: bytes
    k_init: bytes
    chain: bytes
    created: float


class SecureChannel:
    """Handshakes and sealed datagrams for one UDP socket.

    ``send(datagram, address)`` puts bytes on the wire; ``receive(datagram, address)`` returns
    ``(session, payload)`` for an authentic DATA datagram and None for everything else (handshake
    messages are answered inside). ``drops`` counts what was dropped, by reason; ``on_drop`` is told too.
    """

    def __init__(
        self,
        identity: NodeIdentity | None,
        checker: CertChecker,
        send: Callable[[bytes, Address], None],
        *,
        handshake_rate: float = 200.0,
        handshake_timeout: float = 3.0,
        on_drop: Callable[[str, Address], None] | None = None,
    ) -> None:
        self.identity = identity
        self.checker = checker
        self._send = send
        self._my_cert = identity.cert.encode() if identity is not None else b""
        self.budget = TokenBucket(handshake_rate, handshake_rate, time.monotonic())
        self.handshake_timeout = handshake_timeout
        self.on_drop = on_drop
        self.drops: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()  # completed, by role, and cookies sent
        self._secrets = [os.urandom(32), os.urandom(32)]
        self._rotated = time.monotonic()
        self._sessions: OrderedDict[int, Session] = OrderedDict()  # by our index
        self._by_addr: dict[Address, Session] = {}  # the newest confirmed session per peer address
        self._half_open: OrderedDict[int, _HalfOpen] = OrderedDict()
        self._outgoing: dict[int, _Outgoing] = {}
        self._dialing: dict[tuple[Address, bytes | None], asyncio.Future] = {}

    # ------------------------------------------------------------------ helpers
    def drop(self, reason: str, address: Any) -> None:
        """Count (and report) one datagram dropped at the wire, here or by the RPC layer above."""
        self.drops[reason] += 1
        if self.on_drop is not None:
            self.on_drop(reason, address)

    def _new_idx(self) -> int:
        while True:
            idx = int.from_bytes(os.urandom(4), "big")
            if idx not in self._sessions and idx not in self._half_open and idx not in self._outgoing:
                return idx

    def _cookie(self, secret: bytes, address: Address, e_pub: bytes) -> bytes:
        return hmac.new(secret, f"{address[0]}|{address[1]}".encode() + e_pub, hashlib.sha256).digest()[:COOKIE_SIZE]

    def _rotate(self) -> None:
        now = time.monotonic()
        if now - self._rotated >= COOKIE_ROTATE:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._rotated = now

    def _keys(self, shared: bytes, i_idx: int, r_idx: int, e_i: bytes, e_r: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        net = self.checker.manifest.network_id.encode()
        h0 = _sha(DOMAIN, net, b"\0", _IDX.pack(i_idx), _IDX.pack(r_idx), e_i, e_r)
        okm = _hkdf(shared, h0, DOMAIN + b"handshake", 96)
        return h0, okm[:32], okm[32:64], okm[64:]

    def _establish(self, my_idx: int, peer_idx: int, address: Address, chain: bytes, th2: bytes, peer: NodeCert | None, initiator: bool) -> Session:
        okm = _hkdf(chain, th2, DOMAIN + b"transport", 64)
        i2r, r2i = ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:])
        s = Session(my_idx, peer_idx, address, i2r if initiator else r2i, r2i if initiator else i2r, peer, initiator)
        self._sessions[my_idx] = s
        while len(self._sessions) > MAX_SESSIONS:
            _, old = self._sessions.popitem(last=False)
            if self._by_addr.get(old.address) is old:
                del self._by_addr[old.address]
        return s

    # ------------------------------------------------------------------ sending
    def seal(self, session: Session, payload: bytes) -> bytes:
        counter = session.sent
        session.sent += 1
        session.used = time.monotonic()
        head = _DATA_HEAD.pack(DATA, session.peer_idx, counter)
        return head + session.send_key.encrypt(b"\0\0\0\0" + head[5:], payload, head)

    def send(self, session: Session, payload: bytes) -> None:
        self._send(self.seal(session, payload), session.address)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def session_at(self, address: Address) -> Session | None:
        s = self._by_addr.get(address)
        return s if s is not None and self._alive(s) else None

    def _alive(self, s: Session) -> bool:
        now = time.monotonic()
        if now - s.used > SESSION_IDLE or now - s.created > REKEY_AFTER + REKEY_GRACE:
            return False
        return s.peer is None or self.checker.still_valid(s.peer)

    def certified(self, node_id: bytes, address: Address) -> bool:
        """True when a live session at ``address`` authenticated the certified node ``node_id``."""
        s = self.session_at(address)
        return s is not None and s.peer_id == node_id

    async def session_to(self, address: Address, expect: bytes | None = None) -> Session | None:
        """A session to the certified node at ``address`` (``expect``: it must be that node id);
        handshakes if there is none. None when no certified node (or not that one) answers."""
        address = (address[0], int(address[1]))
        s = self.session_at(address)
        if s is not None and s.peer is not None and (expect is None or s.peer_id == expect) and (
            not s.initiator or time.monotonic() - s.created < REKEY_AFTER
        ):
            return s
        key = (address, expect)
        pending = self._dialing.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._dial(address, expect))
            self._dialing[key] = pending
            pending.add_done_callback(lambda _f, key=key: self._dialing.pop(key, None))
        return await asyncio.shield(pending)

    async def _dial(self, address: Address, expect: bytes | None) -> Session | None:
        loop = asyncio.get_running_loop()
        for _ in range(2):  # a lost datagram costs one more try
            eph = X25519PrivateKey.generate()
            out = _Outgoing(self._new_idx(), address, expect, eph, eph.public_key().public_bytes_raw(), loop.create_future())
            self._outgoing[out.idx] = out
            try:
                hello = bytes([HELLO]) + _IDX.pack(out.idx) + out.e_pub
                self._send(hello.ljust(HELLO_SIZE, b"\0"), address)
                return await asyncio.wait_for(out.future, self.handshake_timeout)
            except TimeoutError:
                continue
            finally:
                self._outgoing.pop(out.idx, None)
        return None

    # ------------------------------------------------------------------ receiving
    def receive(self, data: bytes, address: Any) -> tuple[Session, bytes] | None:
        address = (address[0], address[1])
        kind = data[0] if data else -1
        if kind == DATA:
            return self._data(data, address)
        if kind == HELLO:
            self._hello(data, address)
        elif kind == COOKIE:
            self._cookie_reply(data, address)
        elif kind == INIT:
            self._init(data, address)
        elif kind == RESP:
            self._resp(data, address)
        elif kind == FIN:
            self._fin(data, address)
        else:
            self.drop("not_protocol", address)
        return None

    def _data(self, data: bytes, address: Address) -> tuple[Session, bytes] | None:
        if len(data) < _DATA_HEAD.size + AEAD_TAG:
            self.drop("malformed_datagram", address)
            return None
        _, idx, counter = _DATA_HEAD.unpack_from(data)
        s = self._sessions.get(idx)
        if s is None or s.address != address:
            self.drop("unknown_session", address)
            return None
        if not s.fresh(counter):
            self.drop("replay", address)
            return None
        try:
            payload = s.recv_key.decrypt(b"\0\0\0\0" + data[5:13], data[13:], data[:13])
        except InvalidTag:
            self.drop("bad_mac", address)
            return None
        if not self._alive(s):
            self._sessions.pop(idx, None)
            self.drop("expired_session", address)
            return None
        s.mark(counter)
        s.used = time.monotonic()
        if s.initiator and not s.confirmed:
            s.confirmed = True
            self._by_addr[address] = s
            self.handshakes["initiator"] += 1
            out = self._outgoing.get(s.my_idx)
            if out is not None and not out.future.done():
                out.future.set_result(s)
        return s, payload

    def _hello(self, data: bytes, address: Address) -> None:
        if self.identity is None or len(data) != HELLO_SIZE:
            self.drop("bad_hello", address)
            return
        self._rotate()
        self.handshakes["cookies_sent"] += 1
        self._send(bytes([COOKIE]) + data[1:5] + self._cookie(self._secrets[0], address, data[5:37]), address)

    def _cookie_reply(self, data: bytes, address: Address) -> None:
        if len(data) != 5 + COOKIE_SIZE:
            self.drop("bad_cookie_reply", address)
            return
        (idx,) = _IDX.unpack_from(data, 1)
        out = self._outgoing.get(idx)
        if out is None or out.address != address or out.session is not None:
            self.drop("unsolicited", address)
            return
        init = bytes([INIT]) + _IDX.pack(idx) + out.e_pub + data[5:]
        self._send(init.ljust(INIT_SIZE, b"\0"), address)

    def _init(self, data: bytes, address: Address) -> None:
        if self.identity is None or len(data) != INIT_SIZE:
            self.drop("bad_init", address)
            return
        self._rotate()
        e_i, cookie = data[5:37], data[37 : 37 + COOKIE_SIZE]
        if not any(hmac.compare_digest(cookie, self._cookie(k, address, e_i)) for k in self._secrets):
            self.drop("bad_cookie", address)
            return
        if not self.budget.take(time.monotonic()):
            self.drop("handshake_budget", address)
            return
        (i_idx,) = _IDX.unpack_from(data, 1)
        try:
            peer_e = X25519PublicKey.from_public_bytes(e_i)
            eph = X25519PrivateKey.generate()
            shared = eph.exchange(peer_e)
        except ValueError:  # a low-order point: no shared secret
            self.drop("bad_init", address)
            return
        e_r = eph.public_key().public_bytes_raw()
        r_idx = self._new_idx()
        h0, k_resp, k_init, chain = self._keys(shared, i_idx, r_idx, e_i, e_r)
        th1 = _sha(h0, self._my_cert)
        sig = self.identity.private_key.sign(SIG_RESP + th1)
        head = bytes([RESP]) + _IDX.pack(i_idx) + _IDX.pack(r_idx) + e_r
        sealed = ChaCha20Poly1305(k_resp).encrypt(bytes(12), _pack_proof(self._my_cert, sig), head)
        now = time.monotonic()
        while self._half_open and (len(self._half_open) >= MAX_PENDING or now - next(iter(self._half_open.values())).created > PENDING_TTL):
            self._half_open.popitem(last=False)
        self._half_open[r_idx] = _HalfOpen(address, i_idx, th1, k_init, chain, now)
        self._send(head + sealed, address)

    def _resp(self, data: bytes, address: Address) -> None:
        if len(data) < 45 + 16:
            self.drop("bad_resp", address)
            return
        i_idx, r_idx = struct.unpack_from(">II", data, 1)
        out = self._outgoing.get(i_idx)
        if out is None or out.address != address or out.session is not None:
            self.drop("unsolicited", address)
            return
        e_r = data[9:41]
        try:
            shared = out.ephemeral.exchange(X25519PublicKey.from_public_bytes(e_r))
            h0, k_resp, k_init, chain = self._keys(shared, i_idx, r_idx, out.e_pub, e_r)
            proof = _unpack_proof(ChaCha20Poly1305(k_resp).decrypt(bytes(12), data[41:], data[:41]))
        except (ValueError, InvalidTag):
            self.drop("bad_resp", address)
            return
        if proof is None or not proof[0]:
            self.drop("bad_resp", address)
            return
        cert_raw, sig = proof
        cert, reason = self.checker.check(cert_raw)
        if cert is None:
            self.drop(f"cert_{reason}", address)
            return
        if out.expect is not None and cert.node_id != out.expect:
            self.drop("wrong_node_id", address)
            return
        th1 = _sha(h0, cert_raw)
        try:
            cert.public_key().verify(sig, SIG_RESP + th1)
        except InvalidSignature:
            self.drop("bad_handshake_signature", address)
            return
        th2 = _sha(th1, self._my_cert)
        my_sig = self.identity.private_key.sign(SIG_INIT + th2) if self.identity is not None else b""
        head = bytes([FIN]) + _IDX.pack(r_idx)
        sealed = ChaCha20Poly1305(k_init).encrypt(bytes(12), _pack_proof(self._my_cert, my_sig), head)
        out.session = self._establish(i_idx, r_idx, address, chain, th2, cert, initiator=True)
        self._send(head + sealed, address)

    def _fin(self, data: bytes, address: Address) -> None:
        if len(data) < 5 + 2 + 16:
            self.drop("bad_fin", address)
            return
        (r_idx,) = _IDX.unpack_from(data, 1)
        half = self._half_open.get(r_idx)
        if half is None or half.address != address:
            self.drop("unsolicited", address)
            return
        try:
            proof = _unpack_proof(ChaCha20Poly1305(half.k_init).decrypt(bytes(12), data[5:], data[:5]))
        except InvalidTag:
            self.drop("bad_fin", address)
            return
        del self._half_open[r_idx]
        if proof is None:
            self.drop("bad_fin", address)
            return
        cert_raw, sig = proof
        peer = None
        th2 = _sha(half.th1, cert_raw)
        if cert_raw:
            peer, reason = self.checker.check(cert_raw)
            if peer is None:
                self.drop(f"cert_{reason}", address)
                return
            try:
                peer.public_key().verify(sig, SIG_INIT + th2)
            except InvalidSignature:
                self.drop("bad_handshake_signature", address)
                return
        s = self._establish(r_idx, half.i_idx, address, half.chain, th2, peer, initiator=False)
        if peer is not None:
            self._by_addr[address] = s
        self.handshakes["responder"] += 1
        self.send(s, b"")  # the first sealed datagram confirms the session to the initiator

    def forget(self, session: Session) -> None:
        """Stop using ``session`` for new requests (its peer stopped answering on it)."""
        if self._by_addr.get(session.address) is session:
            del self._by_addr[session.address]

    def prune(self) -> int:
        """Forget sessions that are idle, too old, or whose certificate the manifest now refuses."""
        dead = [i for i, s in self._sessions.items() if not self._alive(s)]
        for i in dead:
            s = self._sessions.pop(i)
            if self._by_addr.get(s.address) is s:
                del self._by_addr[s.address]
        return len(dead)
