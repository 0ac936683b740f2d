"""The one rule for which copy of a site's cell counts: the newest seq per (site id, packet id).

Every place that holds or reads packets applies it: the DHT client before publishing and after a
query, a node's SQLite store, the verifier's replay state and the evidence stage's collection.

A higher ``seq`` always wins. Two *different* packets under one ``(site, packet id, seq)`` mean the
site signed two versions of one cell on one night (a re-run on changed data without a new ``--seq``,
or a misbehaving signer: an equivocation). The tie goes to the copy with the **lowest rank**, where
the rank is the SHA-256 of the packet's wire bytes (the replay state, which keeps no wire, ranks by
its content digest). That choice depends only on the two packets, never on which arrived first, so
every replica converges on the same copy and two readers of any replicas pool the same numbers.
"First seen" would let network timing pick the figure; "last seen" would let whoever re-delivers
last pick it. A rank of ``None`` (not known) loses to any known rank and never displaces one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qis_fhir.packets.model import Packet


def wire_rank(wire: bytes) -> bytes:
    """The tie-break rank of a packet: SHA-256 of its wire bytes (lower wins)."""
    return hashlib.sha256(wire).digest()


def supersedes(seq: int, rank: bytes | str | None, held_seq: int, held_rank: bytes | str | None) -> bool:
    """True when a copy at (``seq``, ``rank``) replaces the held one of the same (site, packet id)."""
    if seq != held_seq:
        return seq > held_seq
    return rank is not None and (held_rank is None or rank < held_rank)


def newest_per_packet(verified: Iterable[tuple[Packet, bytes]]) -> tuple[list[tuple[Packet, bytes]], int]:
    """Keep one (packet, wire) per (site id, packet id) by :func:`supersedes`.

    ``verified`` must hold verified packets only (the rule trusts their site id and seq). Returns the
    kept pairs sorted by (site id, packet id) and how many inputs were dropped: older seqs, the losing
    side of an equal-seq tie, and repeats of a kept packet.
    """
    best: dict[tuple[str, str], tuple[Packet, bytes, bytes]] = {}
    seen = 0
    for packet, wire in verified:
        seen += 1
        ident = (packet.site_id, packet.packet_id)
        rank = wire_rank(wire)
        held = best.get(ident)
        if held is None or supersedes(packet.seq, rank, held[0].seq, held[2]):
            best[ident] = (packet, wire, rank)
    kept = [(best[k][0], best[k][1]) for k in sorted(best)]
    return kept, seen - len(kept)
