"""The release policy: which packets a site releases for a day, under which seq, and what it remembers.

Every rule about a site's releases lives here, so every publisher (a nightly run, a backfill, a
Dagster partition, later rounds) applies the same ones.

* **Seq** = ``YYYYMMDD * 100 + revision``: the day the export stands for, then 0 for its first
  release and 1, 2, ... for a re-run of that day whose data changed. So a re-run with changed data
  supersedes the day's earlier packets (the verifier accepts a higher seq) instead of being refused
  as an equivocation (same seq, other content), and every release of a later day supersedes every
  revision of an earlier one. At most ``REVISIONS`` releases per day; the seq stays far below
  ``SEQ_MAX`` (99991231 x 100 is about 10^10). Seqs written before revisions existed were the bare
  date (``YYYYMMDD``, below 10^9): :func:`day_of_seq` reads both, and every new seq exceeds them.
* **Never older than the newest release**: a run for a day older than the newest day the site has
  released (a backfill) releases nothing. Its cells are built and counted in its disclosure report,
  but its packets would be stale beside the newer day's (an export is the site's whole data as of
  its day) and every consumer would refuse them as replays where a newer seq is held.
* **Held cells** (differencing over time, ``docs/privacy.md``): a cell whose patient count moved by
  fewer than the network's minimum cell size since its last release re-sends that release unchanged.
* **Recorded at commit, one writer at a time**: the state (``SITE_DIR/released_packets.ndjson``, the
  newest released packet per packet id, and ``release_mark.json``, the newest seq the site used) is
  read and decided on under an exclusive ``flock`` on ``.released_packets.lock`` that is held until the
  run that builds the packets commits; only then is the state rewritten (atomic replace), and never
  backwards. Two partitions running at once therefore release one after the other, each seeing the
  other's release, and a run that fails or is killed after building its packets records nothing
  (the kernel drops the lock of a dead process).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from qis_fhir.errors import QisError, RunIncompleteError, UsageError
from qis_fhir.files import atomic_write, write_json
from qis_fhir.packets.codec import decode_packet, encode_packet
from qis_fhir.packets.model import SEQ_MAX, Packet, PacketFormatError
from qis_fhir.packets.newest import supersedes, wire_rank

if TYPE_CHECKING:
    from qis_fhir.packets.keys import SiteIdentity

log = logging.getLogger(__name__)

RELEASE_STATE = "released_packets.ndjson"
RELEASE_MARK = "release_mark.json"
REVISIONS = 100  # releases of one day's data: seq = YYYYMMDD * REVISIONS + revision
_LEGACY_BELOW = 10**9  # a seq below this is a bare YYYYMMDD (before revisions) or a hand-picked number
#: how long a run waits for another run of the same site to finish releasing (it holds the lock from
#: building its packets to committing its run folder: seconds, or minutes when the previous run's
#: folder is large to delete) before it gives up with a clear error
LOCK_WAIT_S = 600.0


def day_number(day: str | date | datetime | int | None = None) -> int:
    """The day as ``YYYYMMDD`` (a ``YYYY-MM-DD`` partition key, a date, or already a number); None: today (UTC)."""
    if day is None:
        day = datetime.now(UTC).date()
    if isinstance(day, int):
        text = str(day)
    elif isinstance(day, datetime | date):
        text = day.strftime("%Y%m%d")
    else:
        text = str(day).replace("-", "")
    try:
        parsed = datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise UsageError(f"the release day must be a date (YYYY-MM-DD or YYYYMMDD), not {day!r}") from None
    return int(parsed.strftime("%Y%m%d"))


def first_seq(day: int) -> int:
    """The seq of a day's first release."""
    return day * REVISIONS


def day_of_seq(seq: int) -> int:
    """The ``YYYYMMDD`` a seq stands for (a bare pre-revision ``YYYYMMDD`` seq is its own day)."""
    return seq if seq < _LEGACY_BELOW else seq // REVISIONS


def _iso(day: int) -> str:
    text = f"{day:08d}"
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


@dataclass
class Release:
    """One build's view of the site's release state, decided under the site's release lock.

    ``seq`` is what a packet signed by this build carries; ``stale`` says the site already released
    a newer day, so this build releases nothing. Hand the packets it releases to :meth:`stage`; they
    are recorded when the ``open_release`` block exits without an error."""

    path: Path
    site_id: str
    day: int
    previous: dict[str, Packet]  # the newest released packet per packet id, under the current key
    newest: int | None  # the highest seq this site has released (any key), None before the first
    seq: int = field(init=False)
    stale: bool = field(init=False)
    _staged: list[Packet] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.stale = self.newest is not None and day_of_seq(self.newest) > self.day
        # a later day starts at revision 0; the same day goes one revision past the newest
        self.seq = max(first_seq(self.day), -1 if self.newest is None else self.newest + 1)
        if not self.stale and (day_of_seq(self.seq) != self.day or self.seq > SEQ_MAX):
            raise QisError(f"{_iso(self.day)} was released {REVISIONS} times already; its data can be released again with the next day's export")

    def held(self, packet_id: str, patients: int, min_cell_size: int, measured: int | None = None) -> Packet | None:
        """The earlier release to re-send unchanged when fewer than ``min_cell_size`` patients changed
        since it, so no two releases of a cell can be differenced down to fewer patients.

        A control cell's mean covers only its ``measured`` patients (wire v2), so it is held too when
        that number moved by fewer than ``min_cell_size`` while both releases carry a mean: otherwise
        ``mean2 * m2 - mean1 * m1`` would give the sum of the readings of the few patients who came or
        went, even though the denominator moved by many."""
        before = self.previous.get(packet_id)
        if before is None:
            return None
        if abs(patients - before.patients) < min_cell_size:
            return before
        both_have_a_mean = measured is not None and measured > 0 and (before.measured or 0) > 0
        return before if both_have_a_mean and abs(measured - before.measured) < min_cell_size else None

    def stage(self, packets: list[Packet]) -> None:
        """The packets this build releases (new ones at ``seq``, held ones as released before)."""
        if self.stale and packets:
            raise ValueError("a stale release releases no packets")
        wrong = [p for p in packets if p.site_id != self.site_id or p.seq > self.seq]
        if wrong:
            raise ValueError(f"{len(wrong)} packets are not this site's or carry a seq above {self.seq}")
        self._staged = list(packets)

    def summary(self) -> dict:
        """What the disclosure report and the logs say about this release."""
        newest_day = None if self.newest is None else _iso(day_of_seq(self.newest))
        if self.stale:
            return {"day": _iso(self.day), "status": "stale", "seq": None, "newest_released_day": newest_day}
        return {"day": _iso(self.day), "status": "released", "seq": self.seq, "revision": self.seq % REVISIONS,
                "newest_released_day": newest_day}

    def _commit(self) -> None:
        if self.stale or self._staged is None:
            return  # nothing released: the state stays byte for byte as it was
        merged = dict(self.previous)
        for p in self._staged:
            held = merged.get(p.packet_id)
            if held is None or supersedes(p.seq, wire_rank(encode_packet(p)), held.seq, wire_rank(encode_packet(held))):
                merged[p.packet_id] = p
        if merged != self.previous:
            atomic_write(self.path, b"".join(encode_packet(p) + b"\n" for _, p in sorted(merged.items())))
        signed_now = any(p.seq == self.seq for p in self._staged)
        mark = max(self.newest or 0, self.seq if signed_now else first_seq(self.day))
        if mark != self.newest:
            write_json(self.path.with_name(RELEASE_MARK), {"newest_seq": mark, "newest_day": _iso(day_of_seq(mark))})


def release_line(summary: dict) -> str:
    """One line saying what a build released (``Release.summary()``): for logs and Dagster metadata."""
    if summary["status"] == "stale":
        return (f"nothing released: {summary['day']} is older than the newest day this site released "
                f"({summary['newest_released_day']}); the release state is left as it was")
    return f"released {summary['day']} as seq {summary['seq']} (revision {summary['revision']})"


def _read_state(path: Path, site: SiteIdentity) -> tuple[dict[str, Packet], int | None]:
    """The current key's newest packet per id, and the newest seq the site used (packets and mark)."""
    released: dict[str, Packet] = {}
    newest: int | None = None
    if path.exists():
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                p = decode_packet(line)
            except PacketFormatError as exc:
                raise QisError(f"{path}:{number}: release state is corrupt ({exc}); move the file away to start afresh") from None
            if p.site_id != site.site_id:
                continue
            newest = p.seq if newest is None else max(newest, p.seq)
            if p.key_id == site.key_id:  # a rotated key re-signs everything
                released[p.packet_id] = p
    mark_path = path.with_name(RELEASE_MARK)
    if mark_path.exists():
        try:
            mark = orjson.loads(mark_path.read_bytes())["newest_seq"]
            if type(mark) is not int or mark < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise QisError(f"{mark_path} is corrupt; restore it from a backup (deleting it lets an older day be released again)") from None
        newest = mark if newest is None else max(newest, mark)
    return released, newest


@contextlib.contextmanager
def _locked(path: Path, wait_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunIncompleteError(f"another run has been releasing packets from {path.parent} for over {wait_s:.0f} s; try again when it has finished") from None
                time.sleep(0.05)  # a lock has no wait-with-timeout: poll it up to the deadline
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def open_release(site: SiteIdentity, day: str | date | int | None = None, *, path: Path | str | None = None,
                 wait_s: float = LOCK_WAIT_S) -> Iterator[Release]:
    """The site's release state for ``day``, locked until the block exits; what was staged is recorded
    only when the block exits without an error. ``path``: the state file (default
    ``SITE_DIR/released_packets.ndjson``)."""
    path = Path(path) if path is not None else site.site_dir / RELEASE_STATE
    with _locked(path, wait_s):
        previous, newest = _read_state(path, site)
        release = Release(path, site.site_id, day_number(day), previous, newest)
        if release.stale:
            log.warning("release: %s", release_line(release.summary()))
        yield release
        release._commit()


def load_release_state(path: Path | str, site: SiteIdentity) -> dict[str, Packet]:
    """Packets this site released before, by packet id (only those signed with its current key)."""
    return _read_state(Path(path), site)[0]
