"""Keyed condition fingerprints: which cohort a packet is about, readable only inside the network.

fingerprint = HMAC-SHA256(network secret, domain || canonical JSON of
{mapping_version, bucket, cohort: {age_band, sex}}), as 64 hex chars.

Why keyed: a bare SHA-256 of a condition code is reversed by hashing every SNOMED CT concept (about
350,000) or here simply every bucket x age band x sex (a few hundred). The HMAC key keeps outsiders
(anyone who reads the DHT without the network secret) from telling which cohort a packet describes.
It does not hide that from member sites: any member holds the secret and can compute the fingerprint
of every cohort in the mapping. See docs/privacy.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import orjson

FINGERPRINT_DOMAIN = b"qis-fhir/fingerprint/v1\n"


def cohort_fingerprint(network_secret: bytes, mapping_version: str, bucket: str, cohort: Mapping[str, str]) -> str:
    """64-hex fingerprint of one cohort (e.g. ``{"age_band": "45-64", "sex": "female"}``) of one bucket."""
    if len(network_secret) < 16:
        raise ValueError("network secret must be at least 16 bytes")
    message = FINGERPRINT_DOMAIN + orjson.dumps(
        {"mapping_version": mapping_version, "bucket": bucket, "cohort": {str(k): str(v) for k, v in cohort.items()}},
        option=orjson.OPT_SORT_KEYS,
    )
    return hmac.new(network_secret, message, hashlib.sha256).hexdigest()


class Fingerprinter:
    """Fingerprints for one network and mapping version, memoised (a site has a few hundred cohorts)."""

    def __init__(self, network_secret: bytes, mapping_version: str) -> None:
        if len(network_secret) < 16:
            raise ValueError("network secret must be at least 16 bytes")
        self._secret = network_secret
        self.mapping_version = mapping_version
        self._cache: dict[tuple[str, str, str], str] = {}

    def __call__(self, bucket: str, age_band: str, sex: str) -> str:
        key = (bucket, age_band, sex)
        fp = self._cache.get(key)
        if fp is None:
            fp = cohort_fingerprint(self._secret, self.mapping_version, bucket, {"age_band": age_band, "sex": sex})
            self._cache[key] = fp
        return fp

    def __repr__(self) -> str:  # never print the secret
        return f"Fingerprinter(mapping_version={self.mapping_version!r})"


def cohort_table(network_secret: bytes, mapping) -> dict[str, tuple[str, str, str]]:
    """fingerprint -> (bucket, age band, sex) for every cohort the mapping can produce.

    What a member site uses to look up its cohorts in the DHT and to label the packets it gets back.
    It is also exactly the dictionary attack ``docs/privacy.md`` describes: any holder of the network
    secret can build it, which is why the secret is shared with member sites only.
    """
    fingerprint = Fingerprinter(network_secret, mapping.version)
    return {
        fingerprint(bucket, band, sex): (bucket, band, sex)
        for bucket in sorted(mapping.buckets)
        for band in mapping.cohorts.band_values
        for sex in mapping.cohorts.sex_values
    }
