"""Replay state: the highest accepted sequence number per (site, packet id).

The verifier needs two methods, so any store can back it (the DHT keeps it in SQLite):

    get(site_id, packet_id) -> int | None          highest seq accepted so far
    put(site_id, packet_id, seq, digest) -> None   record an accepted packet

and, optionally, ``get_digest(site_id, packet_id) -> str | None``: the content digest of the packet
accepted at that seq. With it, a packet at the *same* seq is told apart as a harmless re-delivery
(same digest: accepted as ``duplicate``, counted once) or an equivocation (different content under a
seq already used: rejected). A store without ``get_digest`` treats every equal-seq packet as a
duplicate (idempotent, never counted twice, but a signer's equivocation goes unnoticed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import orjson

from qis_fhir.files import atomic_write
from qis_fhir.packets.newest import supersedes


@runtime_checkable
class ReplayState(Protocol):
    def get(self, site_id: str, packet_id: str) -> int | None: ...

    def put(self, site_id: str, packet_id: str, seq: int, digest: str | None = None) -> None: ...


class MemoryReplayState:
    """In-memory replay state; ``save``/``load`` persist it as JSON for command-line consumers."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[int, str | None]] = {}

    def get(self, site_id: str, packet_id: str) -> int | None:
        entry = self._seen.get((site_id, packet_id))
        return None if entry is None else entry[0]

    def get_digest(self, site_id: str, packet_id: str) -> str | None:
        entry = self._seen.get((site_id, packet_id))
        return None if entry is None else entry[1]

    def put(self, site_id: str, packet_id: str, seq: int, digest: str | None = None) -> None:
        current = self._seen.get((site_id, packet_id))
        if current is None or supersedes(seq, digest, current[0], current[1]):  # never moves backwards
            self._seen[(site_id, packet_id)] = (seq, digest)

    def __len__(self) -> int:
        return len(self._seen)

    def save(self, path: Path | str) -> None:
        rows = [[s, p, q, d] for (s, p), (q, d) in sorted(self._seen.items())]
        atomic_write(Path(path), orjson.dumps({"replay": rows}))  # a torn write would lose every seq seen

    @classmethod
    def load(cls, path: Path | str) -> MemoryReplayState:
        state = cls()
        path = Path(path)
        if path.exists():
            for s, p, q, d in orjson.loads(path.read_bytes())["replay"]:
                state.put(s, p, int(q), d)
        return state
