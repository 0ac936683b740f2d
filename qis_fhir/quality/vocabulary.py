"""The small vocabulary of expectation names a ``quality.yaml`` may use, and the GE class behind each.

Keeping our own names (``not_null``, ``in_set``, ...) instead of raw great-expectations class names
keeps suite files short, lets us check arguments with line-precise errors before GE is imported,
and leaves room to change GE versions without rewriting every mapping version's suites.

Each entry knows how to expand its YAML arguments into rules (a list of columns becomes one rule per
column), how to say in words what it expects, and how to build the GE expectation (lazily: importing
great_expectations costs seconds).

Only ``plausible_range`` tolerates failing rows (great-expectations' ``mostly``, which it requires).
It says a measured value lies in a physiologically possible range: one typo in a lab feed of tens of
thousands of lines should be reported, not stop the night. Every other expectation checks structure
(ids, codes, units, types, counts, the mapping's own values), where one failing row means the export
or a stage is wrong, so ``suites.py`` refuses ``mostly`` on them when ``quality.yaml`` is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: GE suite parameter filled at validation time with "now" (UTC), for ``not_in_future``
NOW_PARAMETER = "qis_now"


class RuleArgumentError(ValueError):
    """Bad arguments for one expectation; ``suites.py`` adds file and line."""


Expanded = list[tuple[tuple[str, ...], dict[str, Any]]]


def _columns(args: Any) -> list[str]:
    if isinstance(args, str) and args:
        return [args]
    if isinstance(args, list) and args and all(isinstance(c, str) and c for c in args):
        return list(args)
    if isinstance(args, dict) and "column" in args:
        return _columns(args["column"])
    if isinstance(args, dict) and "columns" in args:
        return _columns(args["columns"])
    raise RuleArgumentError("expects a column name or a list of column names")


def _mapping(args: Any, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise RuleArgumentError(f"expects a mapping with {', '.join(sorted(required))}")
    missing = sorted(required - set(args))
    if missing:
        raise RuleArgumentError(f"missing argument(s): {', '.join(missing)}")
    unknown = sorted(set(args) - required - optional)
    if unknown:
        raise RuleArgumentError(f"unknown argument(s): {', '.join(unknown)}")
    return dict(args)


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuleArgumentError(f"{name} must be a number")
    return value


def _mostly(args: dict[str, Any]) -> dict[str, Any]:
    mostly = args["mostly"]
    if isinstance(mostly, bool) or not isinstance(mostly, (int, float)) or not 0 < mostly <= 1:
        raise RuleArgumentError("mostly must be a fraction in (0, 1]")
    return {"mostly": float(mostly)}


# ----------------------------------------------------------------------------- expand (YAML -> rules)


def _per_column(args: Any) -> Expanded:
    if isinstance(args, dict):
        a = _mapping(args, {"column"})
        return [((c,), {}) for c in _columns(a["column"])]
    return [((c,), {}) for c in _columns(args)]


def _expand_regex(args: Any) -> Expanded:
    a = _mapping(args, {"column", "regex"})
    try:
        re.compile(a["regex"])
    except (re.error, TypeError) as exc:
        raise RuleArgumentError(f"regex does not compile: {exc}") from None
    return [((c,), {"regex": a["regex"]}) for c in _columns(a["column"])]


def _expand_in_set(args: Any) -> Expanded:
    a = _mapping(args, {"column", "values"})
    values = a["values"]
    if isinstance(values, tuple):
        values = list(values)
    if not isinstance(values, list) or not values:
        raise RuleArgumentError("values must be a non-empty list")
    return [((c,), {"values": tuple(values)}) for c in _columns(a["column"])]


def _expand_equals(args: Any) -> Expanded:
    a = _mapping(args, {"column", "value"})
    if isinstance(a["value"], (list, tuple, dict)):
        raise RuleArgumentError("value must be a single value (use in_set for several)")
    return [((c,), {"value": a["value"]}) for c in _columns(a["column"])]


def _bounds(a: dict[str, Any]) -> dict[str, Any]:
    lo, hi = _number(a.get("min"), "min"), _number(a.get("max"), "max")
    if lo is None and hi is None:
        raise RuleArgumentError("needs min, max or both")
    if lo is not None and hi is not None and lo > hi:
        raise RuleArgumentError(f"min {lo} is greater than max {hi}")
    return {"min": lo, "max": hi}


def _expand_between(args: Any) -> Expanded:
    a = _mapping(args, {"column"}, {"min", "max"})
    return [((c,), _bounds(a)) for c in _columns(a["column"])]


def _expand_plausible(args: Any) -> Expanded:
    a = _mapping(args, {"column", "mostly"}, {"min", "max"})
    return [((c,), {**_bounds(a), **_mostly(a)}) for c in _columns(a["column"])]


def _expand_of_type(args: Any) -> Expanded:
    a = _mapping(args, {"column", "type"})
    if not isinstance(a["type"], str) or not a["type"]:
        raise RuleArgumentError("type must be a dtype name such as bool, float64, int64")
    return [((c,), {"type": a["type"]}) for c in _columns(a["column"])]


_IDENT = re.compile(r"(?<![0-9.A-Za-z_])[A-Za-z_][A-Za-z0-9_]*")
_EXPR_ALLOWED = re.compile(r"^[A-Za-z0-9_\s.+\-*/()]+$")
_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*\s*[.(]|\.\s*[A-Za-z_]")  # attribute access or a call


def _expand_expression(args: Any) -> Expanded:
    a = _mapping(args, {"expression"}, {"min", "max"})
    expr = a["expression"]
    # Arithmetic on column names only: the expression is evaluated with DataFrame.eval, and keeping
    # it to + - * / ( ) and names means a suite file cannot smuggle in calls or attribute access.
    if not isinstance(expr, str) or not _EXPR_ALLOWED.match(expr) or _ATTRIBUTE.search(expr):
        raise RuleArgumentError("expression may hold only column names, numbers and + - * / ( )")
    cols = tuple(dict.fromkeys(m for m in _IDENT.findall(expr)))
    if not cols:
        raise RuleArgumentError("expression must name at least one column")
    return [(cols, {"expression": expr, **_bounds(a)})]


def _expand_row_count(args: Any) -> Expanded:
    a = _mapping(args, set(), {"min", "max"})
    return [((), _bounds(a))]


def _expand_compound_unique(args: Any) -> Expanded:
    a = _mapping(args, {"columns"})
    cols = _columns(a["columns"])
    if len(cols) < 2:
        raise RuleArgumentError("columns must list at least two columns (use unique for one)")
    return [(tuple(cols), {})]


# ----------------------------------------------------------------------------- describe (rule -> words)


def _range_text(args: dict[str, Any]) -> str:
    lo, hi = args.get("min"), args.get("max")
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def set_text(values: tuple[Any, ...] | list[Any], limit: int = 8) -> str:
    """``{a, b, ... (+n more)}``: a rule's expected values in a report line."""
    shown = ", ".join(str(v) for v in values[:limit])
    more = len(values) - limit
    return "{" + shown + (f", ... (+{more} more)" if more > 0 else "") + "}"


def _mostly_text(args: dict[str, Any]) -> str:
    return f" for at least {args['mostly'] * 100:.4g}% of rows"


# ----------------------------------------------------------------------------- build (rule -> GE)


def _ge_kwargs(rule: Any) -> dict[str, Any]:
    """Arguments every GE expectation of a rule shares: mostly, row condition, our rule index."""
    kwargs: dict[str, Any] = {}
    if "mostly" in rule.args:
        kwargs["mostly"] = rule.args["mostly"]
    if rule.where:
        from great_expectations.expectations.row_conditions import Column

        cond = None
        for col, values in rule.where.items():
            part = Column(col) == values[0] if len(values) == 1 else Column(col).is_in(list(values))
            cond = part if cond is None else (cond & part)
        kwargs["row_condition"] = cond
    return kwargs


def build_expectation(rule: Any, column: str | None = None) -> Any:
    """The great-expectations expectation for ``rule`` (``column`` overrides, for derived columns)."""
    import great_expectations.expectations as gxe

    a = rule.args
    col = column if column is not None else rule.column
    kw = _ge_kwargs(rule)
    match rule.name:
        case "column_exists" | "columns_exist":
            return gxe.ExpectColumnToExist(column=col)
        case "not_null":
            return gxe.ExpectColumnValuesToNotBeNull(column=col, **kw)
        case "unique":
            return gxe.ExpectColumnValuesToBeUnique(column=col, **kw)
        case "matches_regex":
            return gxe.ExpectColumnValuesToMatchRegex(column=col, regex=a["regex"], **kw)
        case "in_set":
            return gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(a["values"]), **kw)
        case "equals":
            return gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[a["value"]], **kw)
        case "between" | "expression_between" | "plausible_range":
            return gxe.ExpectColumnValuesToBeBetween(column=col, min_value=a["min"], max_value=a["max"], **kw)
        case "not_in_future":
            return gxe.ExpectColumnValuesToBeBetween(column=col, max_value={"$PARAMETER": NOW_PARAMETER}, **kw)
        case "of_type":
            return gxe.ExpectColumnValuesToBeOfType(column=col, type_=a["type"])
        case "row_count_between":
            return gxe.ExpectTableRowCountToBeBetween(min_value=a["min"], max_value=a["max"])
        case "compound_unique":
            return gxe.ExpectCompoundColumnsToBeUnique(column_list=list(rule.columns), **kw)
    raise AssertionError(f"no GE builder for {rule.name}")  # VOCABULARY and this match go together


@dataclass(frozen=True)
class ExpectationKind:
    """One vocabulary entry. ``kind``: ``schema`` (column presence), ``rows`` (per-row condition:
    the result is a count of unexpected rows), ``table`` (one aggregate such as the row count) or
    ``dtype`` (the column's type). ``tolerant``: may take ``mostly`` (a share of rows that must pass);
    only ``plausible_range`` is, see the module docstring."""

    expand: Callable[[Any], Expanded]
    describe: Callable[[dict[str, Any]], str]
    kind: str
    supports_where: bool = True
    tolerant: bool = False


VOCABULARY: dict[str, ExpectationKind] = {
    "column_exists": ExpectationKind(_per_column, lambda a: "column present", "schema", supports_where=False),
    "columns_exist": ExpectationKind(_per_column, lambda a: "column present", "schema", supports_where=False),
    "not_null": ExpectationKind(_per_column, lambda a: "no nulls", "rows"),
    "unique": ExpectationKind(_per_column, lambda a: "no duplicate values", "rows"),
    "matches_regex": ExpectationKind(_expand_regex, lambda a: f"matches {a['regex']}", "rows"),
    "in_set": ExpectationKind(_expand_in_set, lambda a: f"in {set_text(a['values'])}", "rows"),
    "equals": ExpectationKind(_expand_equals, lambda a: f"equal to {a['value']}", "rows"),
    "between": ExpectationKind(_expand_between, _range_text, "rows"),
    "plausible_range": ExpectationKind(
        _expand_plausible, lambda a: _range_text(a) + _mostly_text(a), "rows", tolerant=True
    ),
    "not_in_future": ExpectationKind(_per_column, lambda a: "not later than the time of the check", "rows"),
    "of_type": ExpectationKind(_expand_of_type, lambda a: f"dtype {a['type']}", "dtype", supports_where=False),
    "expression_between": ExpectationKind(_expand_expression, lambda a: f"{a['expression']} {_range_text(a)}", "rows"),
    "row_count_between": ExpectationKind(_expand_row_count, lambda a: f"row count {_range_text(a)}", "table", supports_where=False),
    "compound_unique": ExpectationKind(_expand_compound_unique, lambda a: "no duplicate combinations", "rows"),
}
