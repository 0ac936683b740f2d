"""Disclosure control for published cells: minimum cell size and one granularity only.

Two rules, both needed:

* **Small cells are not published.** A cell (bucket x age band x sex x treatment x measure x period)
  with fewer distinct patients than the network's minimum cell size (default 11) is suppressed.
* **One granularity only.** Every published cell is cut by exactly the same dimensions, and no margin
  or total is ever published beside them. Cells of one granularity are disjoint, so no published cell
  is the union of others and a suppressed cell cannot be recovered by subtracting published ones
  ("differencing"): e.g. publishing (diabetes, 45-64, all sexes) next to (diabetes, 45-64, female)
  would reveal the suppressed (diabetes, 45-64, male) cell.

The disclosure report says how many cells were published and suppressed per bucket: nothing finer
(no cell keys, no patient counts), so the report itself can be shown to anyone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: the one granularity packets are published at, in order
CELL_DIMENSIONS: tuple[str, ...] = ("bucket", "age_band", "sex", "treatment", "measure", "period")
#: values that would mark a margin or total; they never appear in a published cell key
MARGIN_VALUES = frozenset({"", "*", "all", "ALL", "any", "total", "TOTAL"})
REPORT_FORMAT = "qis-fhir/disclosure/v1"


class DisclosureError(ValueError):
    """Published cells would break the disclosure rules (a bug in the builder, never user data)."""


def is_publishable(patients: int, min_cell_size: int) -> bool:
    return patients >= min_cell_size


def check_single_granularity(cells: Iterable[Sequence[str]], dims: Sequence[str] = CELL_DIMENSIONS) -> None:
    """Raise ``DisclosureError`` unless every cell key has every dimension, no margin value, no repeat.

    Cells that share all dimensions but one are disjoint only if none of them is a total; with every
    key complete and unique, no published cell can be derived from (or be the union of) others.
    """
    seen: set[tuple[str, ...]] = set()
    for cell in cells:
        key = tuple(cell)
        if len(key) != len(dims):
            raise DisclosureError(f"a cell key has {len(key)} dimensions, expected {len(dims)}: {', '.join(dims)}")
        for dim, value in zip(dims, key, strict=True):
            if not isinstance(value, str) or value in MARGIN_VALUES:
                raise DisclosureError(f"cell dimension {dim} holds a margin or total value")
        if key in seen:
            raise DisclosureError("the same cell would be published twice")
        seen.add(key)


def disclosure_report(
    published_buckets: Iterable[str],
    suppressed_buckets: Iterable[str],
    *,
    min_cell_size: int,
    mapping_version: str,
    period: str,
    seq: int,
    held_buckets: Iterable[str] = (),
    secure_buckets: Iterable[str] = (),
) -> dict:
    """Counts of cells published and suppressed, per bucket and in total. Nothing else.

    ``held`` counts the published cells re-released unchanged because fewer than ``min_cell_size``
    patients changed since their last release (they are included in ``published``).
    ``in_secure_total`` counts the cells large enough to publish that are not published because this
    site's patients of them are already in a released secure total (they would be counted twice).
    """
    kinds = ("published", "suppressed", "held", "in_secure_total")
    by_bucket: dict[str, dict[str, int]] = {}
    for name, buckets in zip(kinds, (published_buckets, suppressed_buckets, held_buckets, secure_buckets)):
        for b in buckets:
            entry = by_bucket.setdefault(b, dict.fromkeys(kinds, 0))
            entry[name] += 1
    totals = {k: sum(e[k] for e in by_bucket.values()) for k in kinds}
    return {
        "format": REPORT_FORMAT,
        "mapping_version": mapping_version,
        "min_cell_size": min_cell_size,
        "granularity": list(CELL_DIMENSIONS),
        "period": period,
        "seq": seq,
        "cells": totals,
        "by_bucket": dict(sorted(by_bucket.items())),
    }
