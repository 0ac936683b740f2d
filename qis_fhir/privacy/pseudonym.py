"""Keyed pseudonyms for resource ids.

``Pseudonymizer(secret).key("Patient/123")`` is HMAC-SHA256 under the site secret, truncated to
128 bits (32 hex chars): stable across nightly runs of one site, unlinkable across sites, and not
reversible by hashing every possible id (which a plain SHA-256 would be). Results are memoised
because a bulk export repeats the same patient reference thousands of times.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_HEX_CHARS = 32


class Pseudonymizer:
    def __init__(self, secret: bytes, *, cache_size: int = 1_000_000) -> None:
        if len(secret) < 16:
            raise ValueError("pseudonym secret must be at least 16 bytes")
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def key(self, reference: str) -> str:
        """Pseudonym of a reference such as ``Patient/abc`` (always ``Type/id``, never a bare id)."""
        cached = self._cache.get(reference)
        if cached is not None:
            return cached
        mac = self._mac.copy()
        mac.update(reference.encode("utf-8"))
        value = mac.hexdigest()[:KEY_HEX_CHARS]
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[reference] = value
        return value
