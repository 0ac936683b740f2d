"""Run folders: how a run replaces the previous one, and the one check every reader makes.

``--out DIR`` (``qis-fhir run``, ``qis-fhir extract``) and a Dagster partition's folder are *run
folders*: every file in one comes from one run, and ``DIR/run.json`` says whether that run completed
and which stages it finished. Without this, a run killed half-way through left its new extract
tables beside the previous run's events, packets and reports, and nothing said so.

* A run writes into a fresh staging sibling, ``DIR.partial``, whose ``run.json`` says ``running``
  from before the first data file is written. Only when every stage has written its files is it set
  to ``complete`` and the staging folder swapped with ``DIR`` by one ``renameat2(RENAME_EXCHANGE)``
  (Linux 3.15+, ext4, xfs, btrfs, tmpfs); the previous run, now at ``DIR.partial``, is then deleted.
  Until that instant ``DIR`` holds the previous complete run, untouched. A run that fails or is
  killed leaves ``DIR.partial`` (``failed``, or ``running`` with its process gone) and ``DIR`` as it
  was; the next run deletes ``DIR.partial`` and starts afresh.
* Where the exchange is not available the swap is two renames (``DIR -> DIR.previous``,
  ``DIR.partial -> DIR``); the next run into ``DIR`` finishes a swap interrupted between them.
* A stage added to a complete run later (publishing its packets, Dagster's ``outcome_events`` after
  ``fhir_extract``) goes through :func:`amend_run`: it clears its stage in ``run.json`` before it
  writes and marks it after, so a reader never takes half of an amendment for a finished stage.
* One writer at a time per folder: ``flock`` on the hidden sibling ``.DIR.lock``.
* Readers (``load_extract``, ``qis-fhir publish`` and ``verify`` of a run's packets, the Dagster
  assets) call :func:`require_run`, which raises ``RunIncompleteError`` (exit 13) for anything but a
  complete run that finished the stages they need. A folder without ``run.json`` is not a run folder
  (tables written by calling ``extract_export`` directly, a packet file made by hand) and is left to
  the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from qis_fhir.errors import AlreadyExistsError, InputNotFoundError, QisError, RunIncompleteError
from qis_fhir.files import write_json

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
STAGING_SUFFIX = ".partial"
PREVIOUS_SUFFIX = ".previous"
FORMAT = 1
RUNNING, COMPLETE, FAILED, REMOVING = "running", "complete", "failed", "removing"
# stage names in run.json (their order and dependencies: ``qis_fhir.stages.ORDER``); a reader names the ones it needs
EXTRACT, OUTCOMES, QUALITY, PACKETS, PUBLISH, EVIDENCE = "extract", "outcomes", "quality", "packets", "publish", "evidence"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errors that mean "this kernel, libc or file system cannot exchange": fall back to two renames
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}

_OWN: set[str] = set()  # run ids this process is writing: a run may read its own unfinished folder


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One writer per run folder: two runs into one ``DIR`` would share ``DIR.partial``. The lock is
    ``flock`` on the hidden sibling ``.DIR.lock``, released by the kernel when a writer dies."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunIncompleteError(f"another run is writing {out} right now; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def staging_path(out: Path) -> Path:
    return out.with_name(out.name + STAGING_SUFFIX)


def previous_path(out: Path) -> Path:
    return out.with_name(out.name + PREVIOUS_SUFFIX)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- reading
def read_manifest(folder: Path) -> dict | None:
    """``folder/run.json`` as a dict, None when there is none; RunIncompleteError when it is unreadable."""
    path = Path(folder) / RUN_JSON
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise RunIncompleteError(f"{path} is unreadable: the run folder cannot be trusted; run again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("stages"), list):
        raise RunIncompleteError(f"{path} is not a run manifest this version understands; run again")
    return data


def _process_alive(manifest: dict) -> bool:
    pid = manifest.get("pid")
    if manifest.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _not_complete(folder: Path, manifest: dict) -> str:
    status = manifest.get("status")
    done = ", ".join(manifest["stages"]) or "none"
    if status == FAILED:
        error = manifest.get("error") or {}
        why = f"run {folder} failed at stage {error.get('stage', '?')} (exit {error.get('exit_code', '?')}): {error.get('message', '')}"
    elif status == RUNNING and _process_alive(manifest):
        why = f"run {folder} is still being written (process {manifest['pid']}); stages done so far: {done}"
    elif status == RUNNING:
        why = f"run {folder} was interrupted before it completed (its process is gone); stages done: {done}"
    else:
        why = f"run {folder} is {status}: a replaced run being deleted"
    if folder.name.endswith(STAGING_SUFFIX):
        why += f"; {folder.name[: -len(STAGING_SUFFIX)]} holds the last complete run, if any"
    return why


def require_run(folder: Path | str, *stages: str) -> dict | None:
    """The one check a reader of a run folder makes before reading anything in it.

    Returns the run manifest of a complete run that finished every stage in ``stages`` (or of the
    unfinished run this process is writing, for its own later stages); None when ``folder`` is not
    a run folder (no ``run.json``), which the caller handles as it did before run folders existed.
    Raises ``RunIncompleteError`` (exit RUN_INCOMPLETE) for a crashed, failed or half-swapped run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if previous_path(folder).is_dir():
            raise RunIncompleteError(
                f"{folder} is missing: a swap to a new run was interrupted; the next run into it restores "
                f"the complete one (now at {previous_path(folder).name})"
            )
        return None
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("status") != COMPLETE and manifest.get("run_id") not in _OWN:
        raise RunIncompleteError(_not_complete(folder, manifest))
    missing = [s for s in stages if s not in manifest["stages"]]
    if missing:
        error = manifest.get("error")
        why = f"; last error at stage {error['stage']}: {error['message']}" if error else ""
        raise RunIncompleteError(f"run {folder} has not finished stage {', '.join(missing)}{why}")
    return manifest


def run_file(path: Path | str, name: str, stage: str) -> Path:
    """The file a reader was pointed at (``path``, or ``path/name`` when ``path`` is a folder), once
    ``require_run`` passed on its folder for ``stage``: ``qis-fhir publish DIR`` and ``verify`` use it."""
    path = Path(path)
    if path.is_dir() or previous_path(path).is_dir():  # a run folder, or one a swap left missing
        path = path / name
    require_run(path.parent, stage)
    return path


# ---------------------------------------------------------------------- writing
class Run:
    """One run's folder and manifest while it is written; ``mark`` a stage once its files are in place."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.current: str | None = None  # the stage being written, named by a failure
        self._held = contextlib.ExitStack()

    def hold(self, context):
        """Enter ``context`` and keep it open until this run commits (``start_run``: after the swap;
        ``amend_run``: after the amendment), exiting it with the run's error if the run fails or with
        none once committed. The packets step holds the site's release state this way, so a release
        is recorded only for a run that committed."""
        return self._held.enter_context(context)

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def _save(self) -> None:
        write_json(self.path / RUN_JSON, self.manifest)

    def begin(self, stage: str) -> None:
        """``stage`` starts writing: a failure from here on is recorded as that stage's."""
        self.current = stage

    def record(self, stage: str, counts: dict) -> None:
        """Keep ``stage``'s counts in ``run.json`` (written with the next mark or failure), done or not."""
        self.manifest["counts"][stage] = counts

    def mark(self, stage: str, counts: dict | None = None) -> None:
        """``stage`` has written every file it writes (invariant: marked only after the files)."""
        if counts is not None:
            self.record(stage, counts)
        if stage not in self.manifest["stages"]:
            self.manifest["stages"].append(stage)
        self._save()

    def _clear(self, stages: tuple[str, ...]) -> None:
        self.manifest["stages"] = [s for s in self.manifest["stages"] if s not in stages]
        self.manifest["error"] = None
        self._save()

    def _failed(self, exc: BaseException, *, status: str | None) -> None:
        if status is not None:
            self.manifest["status"] = status
            self.manifest["finished"] = _now()
        planned = [s for s in self.manifest.get("planned", []) if s not in self.manifest["stages"]]
        if self.current is not None and self.current not in self.manifest["stages"]:
            planned = [self.current]
        code = int(exc.exit_code) if isinstance(exc, QisError) else 1
        message = str(exc) if isinstance(exc, QisError) else f"{type(exc).__name__} (see the log)"
        self.manifest["error"] = {"stage": planned[0] if planned else "?", "exit_code": code, "message": message}
        self._save()


def _new_manifest(command: str, planned: list[str]) -> dict:
    return {
        "format": FORMAT,
        "run_id": secrets.token_hex(8),
        "command": command,
        "status": RUNNING,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _now(),
        "finished": None,
        "planned": list(planned),
        "stages": [],
        "counts": {},
        "error": None,
    }


@contextlib.contextmanager
def start_run(out: Path | str, *, command: str, planned: list[str]) -> Iterator[Run]:
    """Write a new run for ``out`` in ``out.partial``; on leaving the block, swap it into ``out``.

    The block writes under ``run.path`` and marks each stage it finishes. When it raises, the
    staging folder is kept, marked ``failed`` with the error, and ``out`` is left as it was.
    Refuses (AlreadyExistsError) an ``out`` holding files no run wrote: they would be deleted.
    """
    out = Path(out)
    with _exclusive(out):
        recover(out)
        if out.exists() and not _is_run_folder(out):
            raise AlreadyExistsError(f"{out} holds files that no qis-fhir run wrote (no {RUN_JSON}); choose a new or empty folder")
        staging = staging_path(out)
        remove_run_folder(staging)
        staging.mkdir()
        run = Run(staging, _new_manifest(command, planned))
        run._save()
        _OWN.add(run.run_id)
        with run._held:
            try:
                yield run
            except BaseException as exc:
                run._failed(exc, status=FAILED)
                log.warning("run failed; its files are in %s, and %s still holds the previous complete run, if any", staging, out)
                raise
            finally:
                _OWN.discard(run.run_id)
            run.manifest["status"] = COMPLETE
            run.manifest["finished"] = _now()
            run._save()
            _swap(staging, out)
            run.path = out


def record_failed_start(out: Path | str, exc: QisError, *, command: str, stage: str) -> None:
    """Record ``exc`` as a run of ``out`` that failed at ``stage`` before writing anything: what
    ``start_run`` leaves when its block raises at once (``DIR.partial`` failed with the error, ``DIR``
    untouched), for a caller that fails before it can start the run (the Dagster extract's planning
    step, whose run is started by a later step). The caller raises ``exc`` itself; when the folder
    cannot be written (another run holds it), that is logged and nothing is recorded."""
    try:
        with start_run(out, command=command, planned=[stage]) as run:
            run.begin(stage)
            raise exc
    except QisError as raised:
        if raised is not exc:
            log.warning("run folder: the failure was not recorded in %s: %s", staging_path(Path(out)), raised)


@contextlib.contextmanager
def amend_run(folder: Path | str, *, needs: tuple[str, ...], clears: tuple[str, ...]) -> Iterator[Run]:
    """Add stages to a complete run in place: ``clears`` are unmarked before the block writes anything
    (the block marks them again when done), so no reader takes a half-rewritten stage for a finished one.
    A failure is recorded in ``run.json`` under ``error``; the run stays complete for its other stages."""
    folder = Path(folder)
    with _exclusive(folder):
        manifest = require_run(folder, *needs)
        if manifest is None:
            raise InputNotFoundError(f"{folder} is not a run folder (no {RUN_JSON}); run the stages before it first")
        manifest.setdefault("planned", [])
        manifest["planned"] += [s for s in clears if s not in manifest["planned"]]
        run = Run(folder, manifest)
        run._clear(clears)
        with run._held:
            try:
                yield run
            except BaseException as exc:
                run._failed(exc, status=None)
                raise


def _is_run_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / RUN_JSON).is_file() or not any(path.iterdir())


def remove_run_folder(path: Path) -> None:
    """Delete a run folder (a replaced run, a stale staging folder) so that no reader takes what is
    left of it if this is interrupted: ``run.json`` says ``removing`` first and goes last."""
    if not path.exists():
        return
    if not _is_run_folder(path):
        raise AlreadyExistsError(f"{path} holds files that no qis-fhir run wrote (no {RUN_JSON}); move it away")
    manifest_path = path / RUN_JSON
    if manifest_path.exists():
        write_json(manifest_path, {"format": FORMAT, "status": REMOVING, "stages": []})
    for child in path.iterdir():
        if child.name == RUN_JSON:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    manifest_path.unlink(missing_ok=True)
    path.rmdir()


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); OSError when unsupported."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        renameat2 = libc.renameat2  # glibc 2.28+
    except AttributeError:
        raise OSError(errno.ENOSYS, "libc has no renameat2") from None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap(staging: Path, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)  # rename(2) replaces a missing or empty directory in one step
        return
    try:
        exchange(staging, out)
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
        log.info("run folder: no atomic exchange here (%s); swapping with two renames", exc.strerror)
        previous = previous_path(out)
        os.rename(out, previous)  # a crash here leaves out missing: ``recover`` finishes the swap
        os.rename(staging, out)
        remove_run_folder(previous)
    else:
        remove_run_folder(staging)  # the previous run, now under the staging name


def recover(out: Path | str) -> None:
    """Finish (or undo) a two-rename swap of ``out`` that was interrupted, and delete what it replaced."""
    out = Path(out)
    previous = previous_path(out)
    if not previous.exists():
        return
    if not out.exists():
        staging = staging_path(out)
        try:
            new = read_manifest(staging) if staging.is_dir() else None
        except RunIncompleteError:
            new = None
        if new is not None and new.get("status") == COMPLETE:
            os.rename(staging, out)
            log.warning("run folder: finished swapping in the complete run %s", out)
        else:
            os.rename(previous, out)
            log.warning("run folder: restored the previous complete run %s", out)
            return
    remove_run_folder(previous)
