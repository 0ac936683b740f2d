"""Store receipts: a certified node's signature over what it says it did with each packet.

A ``store_packets`` reply is ``{"s": [status per item], "r": signature}``; the signature is the
node's certified key over ``RECEIPT_DOMAIN || network id || node id || key || n`` and, per item,
SHA-256 of the wire sent and the status. ``publish`` counts a replica only for a ``stored`` or ``held``
status under a receipt that verifies with the key of a certificate the manifest accepts, made in the
session that carried the request, so a report can never say "confirmed" for a packet no member's
node holds. One signature per batch of up to 64 packets (a batch of 15 signed and checked in about
175 us here, `qis-fhir bench --only dhtflood`).
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidSignature

from qis_fhir.dht.certs import NodeCert, NodeIdentity

RECEIPT_DOMAIN = b"qis-fhir/dht-receipt/v1\n"


def receipt_bytes(network_id: str, node_id: bytes, key: bytes, wires: list, statuses: list) -> bytes:
    net = network_id.encode("ascii")
    parts = [RECEIPT_DOMAIN, struct.pack(">I", len(net)), net, node_id, key, struct.pack(">I", len(statuses))]
    for wire, status in zip(wires, statuses, strict=True):
        parts.append(hashlib.sha256(wire if isinstance(wire, bytes) else b"").digest())
        s = str(status).encode()
        parts.append(struct.pack(">H", len(s)) + s)
    return b"".join(parts)


def sign_receipt(identity: NodeIdentity, key: bytes, wires: list, statuses: list) -> bytes:
    return identity.private_key.sign(receipt_bytes(identity.cert.network_id, identity.node_id, key, wires, statuses))


def receipt_valid(cert: NodeCert, key: bytes, wires: list, statuses: list, signature: object) -> bool:
    if not isinstance(signature, bytes) or len(statuses) != len(wires):
        return False
    try:
        cert.public_key().verify(signature, receipt_bytes(cert.network_id, cert.node_id, key, wires, statuses))
    except InvalidSignature:
        return False
    return True
