"""What a quality check found, as plain dataclasses a user (and a log) can read safely.

Nothing here holds a cell value: results keep counts, percentages, column names, dtype names and
the rule's own expected values from the YAML. Great-expectations' ``partial_unexpected_list`` and
exception messages (which can quote data) are deliberately never copied in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qis_fhir.errors import QualityError
from qis_fhir.files import write_json
from qis_fhir.quality.suites import Rule


@dataclass(frozen=True)
class ExpectationResult:
    """The outcome of one rule on one table."""

    rule: Rule
    success: bool
    element_count: int | None = None  # rows the rule looked at (after its ``where``)
    unexpected_count: int | None = None
    unexpected_percent: float | None = None  # of the non-null rows looked at
    missing_count: int | None = None  # nulls among them (most rules skip nulls; not_null counts them)
    observed: str | None = None  # safe text: a dtype, a row count, "column missing", an error class

    @property
    def warning(self) -> bool:
        """Passed, but only within its ``mostly``: some rows failed and the report must say so."""
        return self.success and bool(self.unexpected_count)

    def describe_observed(self) -> str:
        if self.observed is not None:
            return self.observed
        if self.unexpected_count is not None:
            n = self.element_count if self.element_count is not None else "?"
            pct = ""
            if self.unexpected_percent is not None:
                of = f" of {n - self.missing_count} non-null" if self.missing_count and n != "?" else ""
                pct = f" ({self.unexpected_percent:.3g}%{of})"
            return f"{self.unexpected_count} of {n} rows unexpected{pct}"
        return "passed" if self.success else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.rule.to_dict(),
            "success": self.success,
            "warning": self.warning,
            "element_count": self.element_count,
            "unexpected_count": self.unexpected_count,
            "unexpected_percent": self.unexpected_percent,
            "missing_count": self.missing_count,
            "observed": self.describe_observed(),
        }

    def format(self) -> str:
        return format_expectation(self.to_dict())


def format_expectation(result: dict[str, Any]) -> str:
    """One expectation's line from its ``to_dict()`` (also as read back from a written report):
    where the rule is, what was observed (counts, never a cell value) and what was expected."""
    cols = ", ".join(result["columns"]) if result["columns"] else "(table)"
    return f"{result['source']} {result['expectation']} on {cols}: observed {result['observed']}; expected {result['expected']}"


@dataclass(frozen=True)
class SuiteResult:
    """One table's suite: every rule's result, and whether all passed."""

    table: str
    rows: int
    results: tuple[ExpectationResult, ...]
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def failures(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success]

    @property
    def warnings(self) -> list[ExpectationResult]:
        return [r for r in self.results if r.warning]

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.rows,
            "success": self.success,
            "expectations": len(self.results),
            "failed": len(self.failures),
            "warnings": len(self.warnings),
            "seconds": round(self.seconds, 3),
            "results": [r.to_dict() for r in self.results],
        }

    def format(self) -> str:
        head = f"table {self.table} ({self.rows} rows): "
        if self.success:
            head += f"all {len(self.results)} expectations passed"
        else:
            head += f"{len(self.failures)} of {len(self.results)} expectations failed"
        if self.warnings:
            head += f", {len(self.warnings)} within tolerance with failing rows"
        lines = [head] + [f"  - {r.format()}" for r in self.failures]
        lines += [f"  - warning: {r.format()}" for r in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class QualityReport:
    """Every checked table of one run, with what identifies the suites and mapping used."""

    results: list[SuiteResult]
    mapping_version: str
    suites_file: str
    suites_sha256: str
    unchecked_tables: list[str] = field(default_factory=list)  # passed in but no suite declared

    @property
    def success(self) -> bool:
        return all(s.success for s in self.results)

    def suite(self, table: str) -> SuiteResult:
        for s in self.results:
            if s.table == table:
                return s
        raise KeyError(table)

    @property
    def warnings(self) -> int:
        return sum(len(s.warnings) for s in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "warnings": self.warnings,
            "mapping_version": self.mapping_version,
            "suites_file": self.suites_file,
            "suites_sha256": self.suites_sha256,
            "tables": {s.table: s.to_dict() for s in self.results},
            "unchecked_tables": list(self.unchecked_tables),
        }

    def format(self) -> str:
        failed = [s for s in self.results if not s.success]
        verdict = "passed" if not failed else f"FAILED ({len(failed)} of {len(self.results)} tables)"
        if self.warnings:
            verdict += f" with {self.warnings} warning{'s' if self.warnings > 1 else ''}"
        lines = [f"quality check {verdict}: suites {self.suites_file} of mapping {self.mapping_version}"]
        lines += [s.format() for s in self.results]
        if self.unchecked_tables:
            lines.append(f"no suite declared for: {', '.join(self.unchecked_tables)}")
        return "\n".join(lines)

    __str__ = format

    def write(self, path: Path | str) -> Path:
        """Write ``to_dict()`` as JSON (``quality_report.json`` of a run, ``quality/<asset>.json`` in Dagster)."""
        path = Path(path)
        write_json(path, self.to_dict())  # creates the folder
        return path

    def raise_for_failure(self) -> None:
        """Raise ``QualityError`` (exit code QUALITY_FAILED) listing every failed expectation."""
        if not self.success:
            raise QualityError(self.format())
