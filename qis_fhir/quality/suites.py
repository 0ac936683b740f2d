"""Quality suites as data: parse ``mappings/<version>/quality.yaml`` into rules.

The suites live beside the mapping YAML so they are versioned (and content-hashed) with it: a site
that moves to mapping v2 gets the v2 checks. This module only reads and checks the YAML; it never
imports great_expectations (see ``engine.py`` for that), so a bad suite file fails fast.

File shape::

    schema: 1
    tables:
      observations:
        - columns_exist: [patient_key, value, source_line]
        - not_null: [patient_key, value]
        - in_set: {column: unit, values: ["mm[Hg]"], where: {code: "8480-6"}}

Each entry names one expectation of the small vocabulary in ``vocabulary.py``. Arguments are a
column (or a list of columns, one rule each) for column-only expectations, else a mapping. Values
may refer to the loaded mapping set: ``$mapping.version``, ``$mapping.content_hash``,
``$mapping.buckets``, ``$mapping.treatments``, ``$mapping.measures``, ``$mapping.control_measures``,
``$mapping.age_bands`` and
``$mapping.sexes`` (the last two include ``unknown``, which the outcome stage uses for missing data),
and ``$mapping.measures.<id>.plausible_min`` / ``plausible_max`` (a measure's ``plausible_range`` in
``outcomes.yaml``, the one definition of it: a range rule on a measure's readings with other figures is
refused at load, see ``_check_measure_ranges``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qis_fhir.errors import MappingError
from qis_fhir.mapping.yamldoc import compose_yaml, mapping_error, read_yaml_text
from qis_fhir.quality.vocabulary import VOCABULARY, RuleArgumentError, set_text

SUITES_FILE = "quality.yaml"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """One expectation on one table, resolved against the mapping set; ``source`` is ``file:line``."""

    table: str
    name: str  # vocabulary name, e.g. "in_set"
    source: str
    columns: tuple[str, ...]  # the columns it reads (empty for table-level rules)
    args: dict[str, Any] = field(hash=False)
    where: dict[str, tuple[Any, ...]] | None = field(default=None, hash=False)

    @property
    def column(self) -> str | None:
        return self.columns[0] if len(self.columns) == 1 else None

    def describe_expected(self) -> str:
        """What the rule expects, in words (from the YAML only: never from data)."""
        text = VOCABULARY[self.name].describe(self.args)
        if self.where:
            cond = " and ".join(
                f"{c} == {v[0]}" if len(v) == 1 else f"{c} in {set_text(v)}" for c, v in self.where.items()
            )
            text += f" (where {cond})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "expectation": self.name,
            "source": self.source,
            "columns": list(self.columns),
            "expected": self.describe_expected(),
        }


@dataclass(frozen=True)
class SuiteSet:
    """Every table's rules from one ``quality.yaml``, plus what identifies that file's content."""

    path: Path
    sha256: str
    tables: dict[str, tuple[Rule, ...]]

    def fingerprint(self, table: str) -> str:
        """Stable id of one table's resolved rules (names the cached great-expectations suite)."""
        rules = [[r.name, r.source, r.columns, r.args, r.where] for r in self.tables[table]]
        blob = json.dumps([table, rules], sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def suites_path(mapping: Any) -> Path:
    """``quality.yaml`` of a loaded mapping set (``MappingSet.path`` is its directory)."""
    return Path(mapping.path) / SUITES_FILE


def _mapping_refs(mapping: Any) -> dict[str, Any]:
    refs = {
        "version": mapping.version,
        "content_hash": mapping.content_hash,
        "buckets": tuple(sorted(mapping.buckets)),
        "treatments": tuple(sorted(mapping.treatments)),
        "measures": tuple(sorted(mapping.measures)),
        "control_measures": tuple(sorted(mapping.control_measures)),
        "age_bands": mapping.cohorts.band_values,
        "sexes": mapping.cohorts.sex_values,
    }
    for m in mapping.measures.values():
        refs[f"measures.{m.id}.plausible_min"] = m.plausible_min
        refs[f"measures.{m.id}.plausible_max"] = m.plausible_max
    return refs


#: Columns holding a measure's readings, per table. A rule reads one measure's rows when its ``where``
#: names the measure's code (and its unit, or no unit) on observations, the measure's id on events.
_MEASURE_VALUES: dict[str, tuple[str, ...]] = {
    "observations": ("value",),
    "outcome_events": ("baseline_value", "followup_value"),
}


def _ranges_one_measure(rule: Rule, m: Any) -> bool:
    if rule.name not in {"between", "plausible_range"} or rule.column not in _MEASURE_VALUES.get(rule.table, ()):
        return False
    if rule.table == "outcome_events":
        return rule.where == {"measure": (m.id,)}
    where = rule.where or {}
    return where.get("code") == (m.loinc,) and where.get("unit", (m.unit,)) == (m.unit,)


def _check_measure_ranges(tables: dict[str, tuple[Rule, ...]], mapping: Any) -> None:
    """Every range rule on one measure's readings uses that measure's ``plausible_range``.

    The outcome stage drops readings outside ``outcomes.yaml``'s range; a quality rule with other
    figures would warn about values the stage uses, or block the night on values it never reads.
    Writing ``$mapping.measures.<id>.plausible_min`` keeps them equal; this refuses a literal that is not.
    """
    errors = []
    for m in mapping.measures.values():
        for rule in (r for rules in tables.values() for r in rules if _ranges_one_measure(r, m)):
            if (rule.args["min"], rule.args["max"]) != (m.plausible_min, m.plausible_max):
                errors.append(
                    f"{rule.source}: {rule.name} on {rule.column} of measure {m.id} is "
                    f"[{rule.args['min']}, {rule.args['max']}], but outcomes.yaml gives plausible_range "
                    f"[{m.plausible_min}, {m.plausible_max}] (write min: $mapping.measures.{m.id}.plausible_min, "
                    f"max: $mapping.measures.{m.id}.plausible_max)"
                )
    if errors:
        raise mapping_error(errors)


def _resolve(value: Any, refs: dict[str, Any], where: str) -> Any:
    """Replace ``$mapping.<name>`` strings (alone or as list items) by the mapping's values."""
    if isinstance(value, str) and value.startswith("$mapping."):
        name = value[len("$mapping.") :]
        if name not in refs:
            raise MappingError(f"{where}: unknown reference {value!r} (known: {', '.join('$mapping.' + k for k in refs)})")
        return refs[name]
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            resolved = _resolve(item, refs, where)
            if isinstance(resolved, tuple) and isinstance(item, str):
                out.extend(resolved)  # a list reference spliced into a value list
            else:
                out.append(resolved)
        return out
    if isinstance(value, dict):
        return {k: _resolve(v, refs, where) for k, v in value.items()}
    return value


def _parse_where(raw: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, dict) or not raw:
        raise MappingError(f"{where}: 'where' must map column names to a value or a list of values")
    out: dict[str, tuple[Any, ...]] = {}
    for col, val in raw.items():
        vals = tuple(val) if isinstance(val, (list, tuple)) else (val,)
        if not vals:
            raise MappingError(f"{where}: 'where' on {col!r} needs at least one value")
        out[str(col)] = vals
    return out


def parse_suites(text: str, mapping: Any, *, path: Path | str = SUITES_FILE) -> SuiteSet:
    """Parse suite YAML text; every problem is a ``MappingError`` naming ``file:line``."""
    path = Path(path)
    fname = path.name
    parsed = compose_yaml(text, fname)
    if parsed is None or not isinstance(parsed.data, dict):
        raise MappingError(f"{fname}:1: expected a mapping with 'schema' and 'tables'")
    doc = parsed.data
    top = parsed.line()
    unknown_keys = sorted(k for k in doc if k not in {"schema", "tables", "description"})
    if unknown_keys:
        raise MappingError(f"{fname}:{top}: unknown top-level key(s): {', '.join(unknown_keys)}")
    if doc.get("schema") != SCHEMA_VERSION:
        raise MappingError(f"{fname}:{top}: 'schema' must be {SCHEMA_VERSION}, got {doc.get('schema')!r}")
    tables_raw = doc.get("tables")
    if not isinstance(tables_raw, dict):
        raise MappingError(f"{fname}:{top}: 'tables' must map table names to lists of expectations")

    refs = _mapping_refs(mapping)
    tables: dict[str, tuple[Rule, ...]] = {}
    tables_line = parsed.line(("tables",))
    for table, entries in tables_raw.items():
        if not isinstance(entries, list) or not entries:
            raise MappingError(f"{fname}:{tables_line}: table {table!r} needs a non-empty list of expectations")
        rules: list[Rule] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise MappingError(
                    f"{fname}:{tables_line}: table {table!r}: each expectation is a one-key mapping, "
                    f"e.g. '- not_null: patient_key' (got {type(entry).__name__})"
                )
            where_txt = f"{fname}:{parsed.line(('tables', table, i))}"
            keys = list(entry)
            if len(keys) != 1:
                raise MappingError(f"{where_txt}: each expectation is a one-key mapping, got keys {keys}")
            name = keys[0]
            spec = VOCABULARY.get(name)
            if spec is None:
                raise MappingError(
                    f"{where_txt}: unknown expectation {name!r} (known: {', '.join(sorted(VOCABULARY))})"
                )
            raw_args = entry[name]
            if isinstance(raw_args, dict) and "mostly" in raw_args and not spec.tolerant:
                tolerant = ", ".join(sorted(n for n, k in VOCABULARY.items() if k.tolerant))
                raise MappingError(
                    f"{where_txt}: {name} takes no 'mostly': it checks structure (ids, codes, units, counts), "
                    f"where one failing row is one too many; only {tolerant} (a range of measured values) "
                    "may tolerate failing rows"
                )
            where = None
            if isinstance(raw_args, dict) and "where" in raw_args:
                if not spec.supports_where:
                    raise MappingError(f"{where_txt}: {name} does not take 'where'")
                where = _parse_where(raw_args["where"], where_txt)
                raw_args = {k: v for k, v in raw_args.items() if k != "where"}
            args = _resolve(raw_args, refs, where_txt)
            try:
                expanded = spec.expand(args)
            except RuleArgumentError as exc:
                raise MappingError(f"{where_txt}: {name}: {exc}") from None
            for columns, rule_args in expanded:
                rules.append(
                    Rule(table=str(table), name=name, source=where_txt, columns=columns, args=rule_args, where=where)
                )
        tables[str(table)] = tuple(rules)
    _check_measure_ranges(tables, mapping)
    return SuiteSet(path=path, sha256=hashlib.sha256(text.encode()).hexdigest(), tables=tables)


def load_suites(mapping: Any, path: Path | str | None = None) -> SuiteSet:
    """Read the suites of ``mapping`` (``<mapping dir>/quality.yaml`` unless ``path`` is given)."""
    p = Path(path) if path is not None else suites_path(mapping)
    try:
        text = read_yaml_text(p)
    except FileNotFoundError:
        raise MappingError(f"{p.name}: no quality suites for mapping {mapping.version} (expected {p})") from None
    return parse_suites(text, mapping, path=p)
