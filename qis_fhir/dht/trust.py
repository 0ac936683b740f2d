"""The node's verifier: the packets stage's ``Verifier`` over a manifest file that may change.

A long-running node is started with ``--network MANIFEST``. When governance adds a site or revokes a
key, the manifest file is replaced; the node notices (a stat at most every ``check_interval``
seconds), loads and signature-checks the new file, and switches to it only if its version is not
older than the one in use (a rollback is refused and logged). Packets signed by keys the new
manifest revokes are then purged from storage (``on_revoked``). Replay state is shared across
manifest versions, so a reload never reopens replays.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("qis_fhir.dht.trust")


class ManifestVerifier:
    """``verify(wire) -> Verdict`` against the newest valid manifest at ``path``."""

    def __init__(
        self,
        path: str | Path,
        *,
        replay: Any = None,
        check_interval: float = 1.0,
        on_revoked: Callable[[set[str]], None] | None = None,
        pinned_state: Path | None = None,
    ) -> None:
        from qis_fhir.packets.manifest import load_manifest, manifest_path_of

        self.path = manifest_path_of(path)
        # with a pin file, a restarted node also refuses a manifest older than one it used before
        self._load = lambda p: load_manifest(p, pinned_state=pinned_state)
        self.replay = replay
        self.check_interval = check_interval
        self.on_revoked = on_revoked
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self.manifest = self._load(self.path)  # raises ManifestError / InputNotFoundError: caller's to report
        self._verifier = self._make(self.manifest)

    def _make(self, manifest: Any) -> Any:
        from qis_fhir.packets.verifier import Verifier

        return Verifier(manifest, replay=self.replay)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def refresh(self, force: bool = False) -> bool:
        """Reload the manifest if its file changed; True when a newer manifest is now in use."""
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return False
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            manifest = self._load(self.path)
        except Exception as exc:  # keep serving with the manifest we trust
            log.warning("manifest %s changed but was refused: %s", self.path, exc)
            return False
        if manifest.version < self.manifest.version:
            log.warning("manifest %s went back to version %d from %d: refused", self.path, manifest.version, self.manifest.version)
            return False
        if manifest.version == self.manifest.version:
            return False
        newly_revoked = set(manifest.revoked_key_ids) - set(self.manifest.revoked_key_ids)
        self.manifest = manifest
        self._verifier = self._make(manifest)
        log.info("manifest version %d in use (%d sites, %d revoked keys)", manifest.version, len(manifest.sites), len(manifest.revoked_key_ids))
        if newly_revoked and self.on_revoked is not None:
            self.on_revoked(newly_revoked)
        return True

    def __call__(self, wire: bytes) -> Any:
        return self._run(wire, record=True)

    def check(self, wire: bytes) -> Any:
        """Verify without touching replay state (a querier screening what it received)."""
        return self._run(wire, record=False)

    def _run(self, wire: bytes, record: bool) -> Any:
        self.refresh()
        verdict = self._verifier.verify(wire, record=record)
        # a site added a moment ago publishes at once: look at the file now rather than in a second
        if verdict.reason == "unknown_key" and self.refresh(force=True):
            verdict = self._verifier.verify(wire, record=record)
        return verdict
