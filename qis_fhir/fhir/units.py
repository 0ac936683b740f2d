"""The UCUM unit allow-list (``ucum_units.txt`` beside this module)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

UNITS_FILE = Path(__file__).with_name("ucum_units.txt")


@lru_cache(maxsize=1)
def allowed_units() -> frozenset[str]:
    """UCUM codes accepted for Observation values; lines starting with ``#`` are comments."""
    codes = set()
    for raw in UNITS_FILE.read_text(encoding="utf-8").splitlines():
        code = raw.strip()
        if code and not code.startswith("#"):
            codes.add(code)
    return frozenset(codes)
