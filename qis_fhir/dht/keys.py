"""Where a packet lives in the Kademlia id space, and the transport's size budget.

A packet is stored under ``dht_key(fingerprint) = SHA-1(fingerprint as ASCII hex)``: 20 bytes, the
package's own id width. This is exactly ``kademlia.utils.digest(fingerprint)``, so the package's stock
``Server.get(fingerprint)`` / ``Server.set(fingerprint, wire)`` address the same key as our
``query``/``publish`` (the benchmark compares them on identical keys). SHA-1's weakened collision
resistance does not matter here: fingerprints are HMAC outputs, a collision would only co-locate two
fingerprints' packets, and every reader filters by the packet's signed ``fingerprint`` field anyway.
"""

from __future__ import annotations

import hashlib
import re

import umsgpack

# rpcudp refuses to send a request whose msgpack body exceeds 8,192 bytes (and does not check
# responses at all). We hold requests AND responses to the same cap, so a reply is never a datagram
# a stricter peer or a small-MTU path would drop.
RPC_CAP = 8192

_FP_RE = re.compile(r"^[0-9a-f]{64}$")


def is_fingerprint(value: object) -> bool:
    """True for a 64-char lowercase hex fingerprint (an HMAC-SHA256 output)."""
    return isinstance(value, str) and bool(_FP_RE.match(value))


def dht_key(fingerprint: str) -> bytes:
    """The 160-bit Kademlia key of a fingerprint (see module docstring)."""
    return hashlib.sha1(fingerprint.encode("ascii")).digest()


def packed_size(obj: object) -> int:
    """Bytes umsgpack needs for ``obj`` (the body rpcudp measures against ``RPC_CAP``)."""
    return len(umsgpack.packb(obj))


def array_header_size(n: int) -> int:
    """msgpack array header bytes for an n-item array (fixarray / array16 / array32)."""
    if n < 16:
        return 1
    if n < 2**16:
        return 3
    return 5


def pack_batches(items: list, base_size: int, cap: int = RPC_CAP, max_items: int = 256) -> list[list]:
    """Split ``items`` into consecutive batches whose packed array plus ``base_size`` fits ``cap``.

    ``base_size`` is the packed size of the enclosing message with an *empty* array in the batch's
    place (which already counts a 1-byte array header). Each batch's exact size is measured the way
    umsgpack will encode it; an item that alone exceeds the budget raises ``ValueError`` (packets are
    at most 512 bytes, so that means a caller bug, not data).
    """
    batches: list[list] = []
    current: list = []
    size = base_size
    for item in items:
        item_size = packed_size(item)
        grown = size + item_size + array_header_size(len(current) + 1) - array_header_size(len(current))
        if current and (grown > cap or len(current) >= max_items):
            batches.append(current)
            current, size = [], base_size
            grown = size + item_size
        if grown > cap:
            raise ValueError(f"one item of {item_size} bytes cannot fit a {cap}-byte RPC")
        current.append(item)
        size = grown
    if current:
        batches.append(current)
    return batches


NODE_RECORD = 26  # 20-byte id + 4-byte IPv4 address + 2-byte port


def pack_nodes(triples: list) -> tuple[bytes, list]:
    """(id, ip, port) triples -> one bytes blob of 26-byte IPv4 records, plus the triples that are not IPv4.

    umsgpack is pure Python: a reply naming 16 nodes as triples costs about as much to pack and unpack
    as everything else in it; one blob costs one object.
    """
    import socket

    blob = bytearray()
    others = []
    for node_id, ip, port in triples:
        try:
            blob += node_id + socket.inet_aton(ip) + int(port).to_bytes(2, "big")
        except (OSError, TypeError, ValueError, OverflowError):
            others.append([node_id, ip, port])
    return bytes(blob), others


def unpack_nodes(blob: object) -> list:
    """The inverse of :func:`pack_nodes` for the blob: a list of [id, ip, port] (malformed input: [])."""
    import socket

    if not isinstance(blob, bytes) or len(blob) % NODE_RECORD:
        return []
    out = []
    for i in range(0, len(blob), NODE_RECORD):
        rec = blob[i : i + NODE_RECORD]
        out.append([rec[:20], socket.inet_ntoa(rec[20:24]), int.from_bytes(rec[24:26], "big")])
    return out
