"""Disclosure rules: one granularity, no margins, and a report that holds only counts per bucket."""

from __future__ import annotations

import pytest

from qis_fhir.privacy.disclosure import (
    CELL_DIMENSIONS,
    DisclosureError,
    check_single_granularity,
    disclosure_report,
    is_publishable,
)

CELL = ("type2_diabetes", "40-64", "female", "TX_0001", "hba1c", "2024")


def test_complete_distinct_cells_pass():
    check_single_granularity([CELL, CELL[:2] + ("male",) + CELL[3:]])


@pytest.mark.parametrize(
    "cells",
    [
        [CELL, CELL[:2] + ("all",) + CELL[3:]],  # a margin over sex next to a cell: differencing
        [CELL, CELL[:1] + ("*",) + CELL[2:]],
        [CELL, CELL[:5]],  # a coarser granularity (no period)
        [CELL, CELL],  # the same cell twice
        [CELL[:5] + ("",)],
    ],
)
def test_margins_other_granularities_and_repeats_are_refused(cells):
    with pytest.raises(DisclosureError):
        check_single_granularity(cells)


def test_threshold():
    assert not is_publishable(10, 11) and is_publishable(11, 11)


def test_report_counts_per_bucket_only():
    r = disclosure_report(["a", "a", "b"], ["a", "c"], min_cell_size=11, mapping_version="v1", period="year", seq=5, held_buckets=["a"])
    assert r["by_bucket"] == {"a": {"published": 2, "suppressed": 1, "held": 1, "in_secure_total": 0}, "b": {"published": 1, "suppressed": 0, "held": 0, "in_secure_total": 0},
                              "c": {"published": 0, "suppressed": 1, "held": 0, "in_secure_total": 0}}
    assert r["cells"] == {"published": 3, "suppressed": 2, "held": 1, "in_secure_total": 0}
    assert r["granularity"] == list(CELL_DIMENSIONS)
