"""Pseudonymous keys for the extract tables.

Every key is ``Pseudonymizer.key("Type/id")``. A resource's *own* key (``Condition/<id>``,
``MedicationRequest/<id>``) is seen exactly once per export, so memoising it only costs memory (a
million cached keys are ~200 MB) and the cache bookkeeping; ``OwnKeys`` computes the same HMAC-SHA256
without a cache, from inner and outer SHA-256 states prepared once (RFC 2104), which is about twice
as fast as copying an ``hmac`` object.
References that repeat (the patient, reason Conditions) go through the memoised ``Pseudonymizer``.
A test checks both give identical keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from qis_fhir.privacy.pseudonym import KEY_HEX_CHARS

_BLOCK = 64  # SHA-256 block size


class OwnKeys:
    """Uncached ``Pseudonymizer(secret).key``: for references that occur once."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("pseudonym secret must be at least 16 bytes")
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def for_type(self, resource_type: str) -> Callable[[str], str]:
        """``key("Type/" + id)`` as a function of the id alone, with ``Type/`` already hashed in."""
        inner = self._inner.copy()
        inner.update((resource_type + "/").encode("utf-8"))
        inner_copy, outer_copy = inner.copy, self._outer.copy
        n = KEY_HEX_CHARS

        def key(rid: str) -> str:
            i = inner_copy()
            i.update(rid.encode("utf-8"))
            o = outer_copy()
            o.update(i.digest())
            return o.hexdigest()[:n]

        return key
