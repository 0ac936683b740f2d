"""A site's side of a secure-aggregation round, advanced one step at a time: the one implementation
behind ``qis-fhir secagg run`` and the Dagster assets (``pipelines/assets/secagg.py``).

A round takes a week (``qis_fhir.dht.rounds.Schedule``: one window per phase, back to back) and a
site's nightly run lasts minutes, so at any moment exactly one step is due: post the phase whose
window is open (the phase before it has closed and can be read), or, once every window closed,
unmask. Between steps the site's side of the round lives in ``STATE_DIR/<round id>/``:

| file | mode | holds |
| --- | --- | --- |
| ``round.json`` | 0644 | the round reference |
| ``state.json`` | 0600 | this round's own secrets (X25519 keys, self-mask seed, the shares it holds for others) and the site's input vector; deleted once the round is unmasked |
| ``sent/<phase>`` | 0600 | each message this site posted, so a retry after a network failure re-posts the identical bytes (nodes answer ``held``) |
| ``status.json`` | 0644 | what the last step did |
| ``result.json`` | 0600 | after unmasking: the totals, the contributors, the sites that dropped |

The input vector is taken once, when the round starts (``advertise``), and kept: a later step with a
different vector is refused, so a re-run cannot change what this site masks. Nothing is guessed about
what the vector means: its cells and fixed-point scale are the caller's (the evidence layer's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qis_fhir.errors import InputNotFoundError, RoundRepeatedError, RoundWindowError, UsageError
from qis_fhir.files import atomic_write, write_json
from qis_fhir.secagg.round import PHASES, SCHEDULE, UNMASK, RoundRef, Schedule

ROUND_FILE = "round.json"
STATE_FILE = "state.json"
SENT_DIR = "sent"
STATUS_FILE = "status.json"
RESULT_FILE = "result.json"
CONTRIBUTION_PHASES = PHASES[:-1]  # advertise .. consistency: the "contribute" step


@dataclass(frozen=True)
class RoundSetup:
    """What every step of one site's round needs."""

    ref: RoundRef
    site: Any  # SiteIdentity
    network: Any  # NetworkContext
    state_dir: Path
    bootstrap: tuple[tuple[str, int], ...]
    bind: Any = None
    required_contributors: frozenset[str] | None = None  # the value round: the presence round's contributors
    ksize: int = 20

    @property
    def folder(self) -> Path:
        return round_folder(self.state_dir, self.ref)


def round_folder(state_dir: Path | str, ref: RoundRef) -> Path:
    return Path(state_dir) / hashlib.sha256(ref.label()).hexdigest()[:32]


def read_round(path: Path | str) -> RoundRef:
    """A round reference from a JSON file (``network_id``, ``mapping_version``, ``measure``, ``period``,
    ``stage``, ``opens``): what governance announces for a round."""
    path = Path(path)
    try:
        data = orjson.loads(path.read_bytes())
        ref = RoundRef(**{k: str(data[k]) for k in ("network_id", "mapping_version", "measure", "period", "stage", "opens")})
        if date.fromisoformat(ref.opens).isoformat() != ref.opens:
            raise ValueError("opens is not YYYY-MM-DD")
        return ref
    except FileNotFoundError:
        raise InputNotFoundError(f"round file {path} does not exist") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputNotFoundError(f"round file {path} is not a round reference ({type(exc).__name__})") from None


def read_vector(path: Path | str) -> np.ndarray:
    """A site's input vector: a 1-D ``uint64`` ``.npy`` file (no pickles)."""
    path = Path(path)
    try:
        vector = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputNotFoundError(f"vector file {path} does not exist") from None
    except ValueError:
        raise InputNotFoundError(f"vector file {path} is not a .npy array of numbers (pickled objects are never loaded)") from None
    if vector.dtype != np.uint64 or vector.ndim != 1 or len(vector) == 0:
        raise InputNotFoundError(f"vector file {path} must hold a non-empty 1-D uint64 array, not {vector.dtype} of shape {vector.shape}")
    return vector


def open_round(round_file: Path | str, *, network_dir: Path | str, state_dir: Path | str, bootstrap: tuple[tuple[str, int], ...],
               site_dir: Path | str | None = None, bind: Any = None, after: Path | str | None = None, ksize: int = 20) -> RoundSetup:
    """Load what a round's steps need, by the rules the site's other steps use (``stages.open_site``:
    the site's pin file guards the manifest). ``site_dir`` None: a member reading only (unmask).
    ``after``: the round file of the presence round this value round follows; its unmasked
    contributors are the only contributor set this site reveals for (the two must count the same sites)."""
    from qis_fhir.packets import load_network, load_site
    from qis_fhir.packets.manifest import PINS

    ref = read_round(round_file)
    site = None if site_dir is None else load_site(site_dir)
    network = load_network(network_dir, pinned_state=None if site_dir is None else Path(site_dir) / PINS)
    if ref.network_id != network.manifest.network_id:
        raise UsageError(f"round file {round_file} is a round of network {ref.network_id}, not of {network.manifest.network_id}")
    required = None
    if after is not None:
        first = read_round(after)
        if SCHEDULE.starts(ref.opens) < SCHEDULE.closes(first.opens, PHASES[-1]):
            raise UsageError(
                f"the value round opens {ref.opens}, before its presence round can be unmasked "
                f"({SCHEDULE.utc(first.opens, PHASES[-1])}): its eligible cells would not be known in its advertise window"
            )
        presence = round_folder(state_dir, first) / RESULT_FILE
        if not presence.exists():
            raise InputNotFoundError(f"the presence round ({after}) has not been unmasked at this site: no {presence}")
        required = frozenset(orjson.loads(presence.read_bytes())["contributors"])
    return RoundSetup(ref, site, network, Path(state_dir), tuple(bootstrap), bind, required, ksize)


# ---------------------------------------------------------------------- state between steps
def _encode(value: Any) -> Any:
    """JSON for the values a ``SiteRound`` keeps between phases (keys, bytes, sets, tuples, dicts)."""
    if isinstance(value, X25519PrivateKey):
        return {"x25519": value.private_bytes_raw().hex()}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (int, str)):
        return value
    raise TypeError(f"round state holds a {type(value).__name__}, which this step cannot keep")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items()
    if kind == "x25519":
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(inner))
    if kind == "bytes":
        return bytes.fromhex(inner)
    if kind == "set":
        return set(inner)
    if kind == "tuple":
        return tuple(_decode(v) for v in inner)
    return {k: _decode(v) for k, v in inner.items()}


def _state_fields(participant: Any) -> list[str]:
    """A ``SiteRound``'s own state: its fields that are filled phase by phase (named ``_...``)."""
    return [f.name for f in dataclasses.fields(participant) if f.name.startswith("_")]


def _save_state(folder: Path, participant: Any) -> None:
    """Everything a ``SiteRound`` learnt or drew so far, so the next step (another process, another
    night) continues it. Only this round's secrets: the site key is never written here."""
    raw = {name: _encode(getattr(participant, name)) for name in _state_fields(participant)}
    raw["vector"] = participant.vector.astype("<u8").tobytes().hex()
    _write_private(folder / STATE_FILE, orjson.dumps(raw, option=orjson.OPT_SORT_KEYS))


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o600)


def _load_state(folder: Path, participant: Any) -> None:
    raw = orjson.loads((folder / STATE_FILE).read_bytes())
    for name in _state_fields(participant):
        empty = getattr(participant, name)
        value = _decode(raw[name])
        setattr(participant, name, type(empty)(value) if isinstance(empty, (set, frozenset)) else value)


def stored_vector(folder: Path) -> np.ndarray | None:
    """The input vector a round started with (kept in its state until the round is unmasked), or None."""
    path = folder / STATE_FILE
    if not path.exists():
        return None
    return np.frombuffer(bytes.fromhex(orjson.loads(path.read_bytes())["vector"]), dtype="<u8").astype(np.uint64)


class _Recording:
    """The board a participant posts to: each message is kept in ``sent/`` (with the participant's
    state) *before* it goes to the network, so a failed post is retried with the identical bytes."""

    def __init__(self, board: Any, folder: Path, participant: Any) -> None:
        self.board = board
        self.folder = folder
        self.participant = participant

    async def post(self, phase: str, site_id: str, blob: bytes) -> None:
        _write_private(self.folder / SENT_DIR / phase, blob)
        _save_state(self.folder, self.participant)
        await self.board.post(phase, site_id, blob)

    async def collect(self, phase: str) -> dict[str, bytes]:
        return await self.board.collect(phase)


# ---------------------------------------------------------------------- the steps
async def _with_board(setup: RoundSetup, clock: Callable[[], float], schedule: Schedule, work: Callable[[Any], Any]) -> Any:
    from qis_fhir.dht.board import DhtBoard
    from qis_fhir.dht.client import DhtClient

    async with DhtClient(list(setup.bootstrap), setup.network.manifest, ksize=setup.ksize, bind=setup.bind) as client:
        return await work(DhtBoard(client, setup.network, setup.ref, setup.site, clock=clock, schedule=schedule))


def _status(setup: RoundSetup, status: dict) -> dict:
    status = {"round": dataclasses.asdict(setup.ref), **status}
    write_json(setup.folder / STATUS_FILE, status)
    return status


def _participant(setup: RoundSetup, vector: np.ndarray) -> Any:
    from qis_fhir.secagg.protocol import Roster, RoundJournal, SiteRound

    return SiteRound(setup.ref, setup.site.site_id, setup.site.private_key, Roster.from_manifest(setup.network.manifest), vector,
                     journal=RoundJournal(setup.state_dir / "journal"), required_contributors=setup.required_contributors)


def _due(setup: RoundSetup, now: float, schedule: Schedule) -> str | None:
    return schedule.phase_at(setup.ref.opens, now)


def post_step(setup: RoundSetup, vector: np.ndarray | None = None, *, clock: Callable[[], float] = time.time,
              schedule: Schedule = SCHEDULE, phases: tuple[str, ...] = PHASES) -> dict:
    """Post this site's message of the phase due now (one of ``phases``)."""
    from qis_fhir.secagg.local import STEPS

    if setup.site is None:
        raise InputNotFoundError("posting to a round needs the site directory (--site; QIS_SITE_DIR in Dagster)")
    folder = setup.folder
    phase = _due(setup, clock(), schedule)
    if phase not in phases:
        wanted = f"the {phases[0]} window" if len(phases) == 1 else f"the {phases[0]} to {phases[-1]} windows"
        now_is = "before the round opens" if phase is None else ("after every window closed" if phase == UNMASK else f"in the {phase} window")
        raise RoundWindowError(f"this step runs in {wanted} of its round; it is {now_is} (round opens {setup.ref.opens})")
    stored = stored_vector(folder)
    if stored is None and phase != PHASES[0]:
        raise RoundWindowError(f"this site did not start the round in its advertise window: it is out of this round (it can unmask after {schedule.utc(setup.ref.opens, PHASES[-1])})")
    if vector is not None and stored is not None and not np.array_equal(np.asarray(vector, dtype=np.uint64), stored):
        raise RoundRepeatedError("a round takes one contribution per site: this vector differs from the one the round started with")
    if stored is None and vector is None:
        raise InputNotFoundError("the round starts with this site's input vector (--vector)")
    participant = _participant(setup, stored if stored is not None else np.asarray(vector, dtype=np.uint64))
    if stored is not None:
        _load_state(folder, participant)
    missed = [p for p in PHASES[: PHASES.index(phase)] if p not in participant._sent]
    if missed:
        raise RoundWindowError(f"this site did not post its {missed[0]} message before that window closed: it is out of this round")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / ROUND_FILE, dataclasses.asdict(setup.ref))

    async def work(board: Any) -> None:
        sent = folder / SENT_DIR / phase
        if sent.exists():  # posted before (a retry, or the same night's second run): the same bytes again
            await board.post(phase, setup.site.site_id, sent.read_bytes())
        else:
            await getattr(participant, STEPS[phase])(_Recording(board, folder, participant))

    asyncio.run(_with_board(setup, clock, schedule, work))
    return _status(setup, {"step": phase, "posted": phase, "next_window_closes": schedule.utc(setup.ref.opens, phase)})


def contribute_step(setup: RoundSetup, vector: np.ndarray | None = None, **kw: Any) -> dict:
    """Advertise, share, mask, confirm: whichever of them is due now."""
    return post_step(setup, vector, phases=CONTRIBUTION_PHASES, **kw)


def reveal_step(setup: RoundSetup, **kw: Any) -> dict:
    """Reveal this site's shares, only once the masked and consistency windows closed."""
    return post_step(setup, None, phases=(PHASES[-1],), **kw)


def unmask_step(setup: RoundSetup, cells: int | None = None, *, clock: Callable[[], float] = time.time, schedule: Schedule = SCHEDULE) -> dict:
    """Sum the round from the board, once its last window closed; writes ``result.json`` (0600) and
    deletes the round's secrets. Any member can unmask, also one that did not contribute (``cells``)."""
    from qis_fhir.secagg.protocol import Roster, unmask

    folder = setup.folder
    if _due(setup, clock(), schedule) != UNMASK:
        raise RoundWindowError(f"a round is unmasked after its last window closes ({schedule.utc(setup.ref.opens, PHASES[-1])})")
    stored = stored_vector(folder)
    length = len(stored) if stored is not None else cells
    if length is None:
        raise InputNotFoundError("this site did not take part in the round: give its number of cells (--cells)")

    async def work(board: Any) -> Any:
        return await unmask(setup.ref, Roster.from_manifest(setup.network.manifest), board, length)

    result = asyncio.run(_with_board(setup, clock, schedule, work))
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / RESULT_FILE, orjson.dumps({
        "totals": [int(v) for v in result.totals],
        "contributors": sorted(result.contributors),
        "dropped": sorted(result.dropped),
    }, option=orjson.OPT_SORT_KEYS))
    (folder / STATE_FILE).unlink(missing_ok=True)
    return _status(setup, {"step": UNMASK, "contributors": len(result.contributors), "dropped": len(result.dropped), "cells": length})


def advance_step(setup: RoundSetup, vector: np.ndarray | None = None, *, cells: int | None = None,
                 clock: Callable[[], float] = time.time, schedule: Schedule = SCHEDULE) -> dict:
    """The one step due now: what a site's nightly run calls to move a round on by one window."""
    due = _due(setup, clock(), schedule)
    if due is None:
        return _status(setup, {"step": None, "opens": setup.ref.opens})
    if due == UNMASK:
        if (setup.folder / RESULT_FILE).exists():
            return _status(setup, {"step": None, "unmasked": True})
        return unmask_step(setup, cells, clock=clock, schedule=schedule)
    return post_step(setup, vector, clock=clock, schedule=schedule)
