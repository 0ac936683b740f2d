"""A suite over a table read in batches: the same rules and the same report as over the whole table.

great-expectations validates each batch (``engine.run_rules``); the per-batch results are combined
here. Every row rule counts rows, so its counts add up over batches, and its verdict and percentage
are recomputed from the sums the way great-expectations computes them over one frame (checked
against whole-table results in tests/quality/test_batches.py and tests/scale/). Schema and dtype
rules must hold in every batch; the row count is the sum. Uniqueness spans batches: a duplicate may
sit in two of them, so ``unique`` and ``compound_unique`` take their unexpected count from one
DuckDB aggregate over the whole Parquet table (rows whose value, or combination, occurs more than
once), which spills to disk rather than grow.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qis_fhir.quality.report import ExpectationResult
from qis_fhir.quality.suites import Rule
from qis_fhir.quality.vocabulary import VOCABULARY

if TYPE_CHECKING:
    import duckdb

#: rules whose unexpected rows may lie in different batches
CROSS_BATCH = frozenset({"unique", "compound_unique"})


def _sum(values: list[int | None]) -> int | None:
    return None if all(v is None for v in values) else sum(v or 0 for v in values)


def combine(rule: Rule, parts: list[ExpectationResult], duplicates: int | None = None) -> ExpectationResult:
    """One rule's results over every batch (in order) as one result over the table.

    ``duplicates``: for ``unique`` / ``compound_unique``, the table's rows whose value occurs more than
    once (``duplicate_rows``), which no batch can count alone."""
    first = parts[0]
    kind = VOCABULARY[rule.name].kind
    if kind == "rows":  # a row rule with a text instead of counts: a column missing or an evaluation error
        broken = next((p for p in parts if p.observed is not None), None)
        if broken is not None:
            return broken
    if kind == "schema":
        return first
    if kind == "dtype":
        return next((p for p in parts if not p.success), first)
    if kind == "table":
        rows = sum(int(p.observed.rsplit(" ", 1)[1]) for p in parts)
        lo, hi = rule.args.get("min"), rule.args.get("max")
        ok = (lo is None or rows >= lo) and (hi is None or rows <= hi)
        return ExpectationResult(rule, ok, observed=f"row count {rows}")
    element = _sum([p.element_count for p in parts])
    missing = _sum([p.missing_count for p in parts])
    unexpected = duplicates if rule.name in CROSS_BATCH else _sum([p.unexpected_count for p in parts])
    # great-expectations: not_null's unexpected rows are its nulls, out of every row; the other rules'
    # are out of the non-null rows; no rows gives no percentage, and a rule with `mostly` passes when
    # the share of good rows reaches it
    denominator = (element or 0) - (0 if rule.name == "not_null" else (missing or 0))
    percent = unexpected / denominator * 100 if denominator > 0 else None
    if "mostly" in rule.args:
        ok = denominator == 0 or (denominator - unexpected) / denominator >= rule.args["mostly"]
    else:
        ok = unexpected == 0
    return replace(first, success=ok, element_count=element, unexpected_count=unexpected, unexpected_percent=percent,
                   missing_count=missing)


def count_duplicates(rules: list[tuple[Path, Rule]]) -> list[int]:
    """``duplicate_rows`` of each (table file, rule), over one DuckDB connection. The quality check runs
    it in a child process (``memory.in_child``): the process that counted a 2-million-Observation
    extract's duplicates held 40 MiB more after, and the aggregate grows with the table up to DuckDB's
    memory limit."""
    from qis_fhir.fhir.scan import connect

    with connect(rules[0][0].parent) as con:
        return [duplicate_rows(con, path, rule) for path, rule in rules]


def duplicate_rows(con: duckdb.DuckDBPyConnection, path: Path, rule: Rule) -> int:
    """Rows of the Parquet table at ``path`` (those the rule's ``where`` selects) whose value of the
    rule's column(s) occurs more than once. As great-expectations counts them: ``unique`` leaves out
    nulls, ``compound_unique`` the rows whose columns are all null, and null equals null in a combination."""
    cols = [f'"{c}"' for c in rule.columns]
    conds, params = [], [str(path)]
    for col, values in (rule.where or {}).items():
        conds.append(f'"{col}" IN ({", ".join("?" for _ in values)})')
        params += list(values)
    conds.append(" OR ".join(f"{c} IS NOT NULL" for c in cols))
    group = ", ".join(cols)
    sql = (f"SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM read_parquet(?) WHERE {' AND '.join(f'({c})' for c in conds)} "
           f"GROUP BY {group} HAVING count(*) > 1)")
    return int(con.execute(sql, params).fetchone()[0])
