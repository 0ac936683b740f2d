"""Load a mapping set directory: parse YAML keeping line numbers, validate, cross-check, hash.

Errors name the file and line (``conditions.yaml:12: ...``) so a clinician editing YAML can find
the problem (``yamldoc.py`` keeps the line of every value).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from jsonschema import Draft202012Validator

from qis_fhir.errors import InputNotFoundError, MappingError
from qis_fhir.mapping.model import (
    CONDITION_SYSTEMS,
    RXNORM,
    AgeBand,
    CohortSpec,
    ConditionBucket,
    ControlMeasure,
    ControlReading,
    MappingSet,
    OutcomeMeasure,
    Treatment,
    match_code,
)
from qis_fhir.mapping.schema import AGE_BAND_PATTERN, SCHEMAS
from qis_fhir.mapping.yamldoc import YamlDoc, mapping_error, read_yaml

_PACKAGED_MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"
#: the folder of the shipped mapping sets, one per version: the wheel's (pyproject force-include) or,
#: in a checkout, its top-level mappings/
MAPPINGS_ROOT = _PACKAGED_MAPPINGS if _PACKAGED_MAPPINGS.is_dir() else Path(__file__).resolve().parents[2] / "mappings"
#: the set a site runs when it names none: v2, whose control and new-user designs see the prevalent
#: users most of an export holds (docs/outcomes.md); v1 stays loadable by its path
DEFAULT_MAPPING_VERSION = "v2"
DEFAULT_MAPPING_DIR = MAPPINGS_ROOT / DEFAULT_MAPPING_VERSION


def _parse(path: Path) -> YamlDoc:
    doc = read_yaml(path)
    if doc is None:
        raise MappingError(f"{path.name}:1: file is empty")
    return doc


def _schema_errors(doc: YamlDoc, schema: dict) -> list[str]:
    out = []
    validator = Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(doc.data), key=lambda e: (doc.line(tuple(e.absolute_path)), e.message)):
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            patterns = [re.compile(p) for p in err.schema.get("patternProperties", {})]
            extras = [k for k in err.instance if k not in allowed and not any(p.search(str(k)) for p in patterns)]
            for extra in extras:
                hint = ""
                if patterns:
                    hint = f" (names must match {', '.join(p.pattern for p in patterns)})"
                elif allowed:
                    hint = f" (allowed: {', '.join(sorted(allowed))})"
                out.append(doc.error(path + (extra,), f"unexpected key {extra!r}{hint}", key=True))
            continue
        if err.validator == "type" and err.validator_value == "string" and isinstance(err.instance, (int, float)):
            out.append(doc.error(path, f"{err.instance!r} must be a quoted string (write '{err.instance}')"))
            continue
        if err.validator == "enum":
            out.append(doc.error(path, f"{err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"))
            continue
        out.append(doc.error(path, err.message))
    return out


def content_hash(directory: Path) -> str:
    """sha256 over every file of the set (sorted relative names, then bytes), ``quality.yaml`` too."""
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for p in files:
        data = p.read_bytes()
        h.update(p.relative_to(directory).as_posix().encode("utf-8") + b"\0")
        h.update(str(len(data)).encode("ascii") + b"\0")
        h.update(data)
    return h.hexdigest()


def _parse_band(text: str) -> AgeBand:
    m = re.match(AGE_BAND_PATTERN, text)
    assert m is not None  # the schema checked the pattern
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else None
    return AgeBand(text, lo, hi)


def load_mapping(path: str | Path | None = None) -> MappingSet:
    """Load, validate and hash the mapping set in ``path`` (default: ``mappings/v2``, shipped in the wheel as ``qis_fhir/mappings/v2``).

    Raises ``MappingError`` listing every problem found, each as ``file:line: where: what``.
    """
    directory = Path(path) if path is not None else DEFAULT_MAPPING_DIR
    if not directory.is_dir():
        raise InputNotFoundError(f"mapping directory {directory} does not exist")
    missing = [n for n in SCHEMAS if not (directory / n).is_file()]
    if missing:
        raise MappingError(f"{directory.name}: missing mapping file(s): {', '.join(missing)}")

    docs = {name: _parse(directory / name) for name in SCHEMAS}
    errors: list[str] = []
    for name, schema in SCHEMAS.items():
        errors += _schema_errors(docs[name], schema)
    if errors:
        raise mapping_error(errors)

    mapping_doc = docs["mapping.yaml"]
    version = mapping_doc.data["version"]
    if version != directory.name:
        errors.append(
            mapping_doc.error(("version",), f"version {version!r} does not match the directory name {directory.name!r}")
        )

    measures = _build_measures(docs["outcomes.yaml"], errors)
    buckets, condition_index = _build_buckets(docs["conditions.yaml"], measures, errors)
    treatments, treatment_index = _build_treatments(docs["treatments.yaml"], buckets, errors)
    cohorts = _build_cohorts(docs["cohorts.yaml"], errors)
    control = _build_control_measures(docs["outcomes.yaml"], buckets, treatments, errors)
    if errors:
        raise mapping_error(errors)

    return MappingSet(
        version=version,
        description=mapping_doc.data.get("description", ""),
        content_hash=content_hash(directory),
        path=directory,
        buckets=buckets,
        treatments=treatments,
        measures=measures,
        cohorts=cohorts,
        control_measures=control,
        treatment_classes={k: tuple(v) for k, v in docs["treatments.yaml"].data.get("treatment_classes", {}).items()},
        washout_days=docs["outcomes.yaml"].data.get("washout_days"),
        _condition_index=condition_index,
        _treatment_index=treatment_index,
    )


def _build_measures(doc: YamlDoc, errors: list[str]) -> dict[str, OutcomeMeasure]:
    measures = {}
    for mid, m in doc.data["measures"].items():
        if m.get("kind", "change") != "change":
            continue
        lo, hi = m["followup_days"]
        if lo > hi:
            errors.append(doc.error(("measures", mid, "followup_days"), f"follow-up window [{lo}, {hi}] is empty"))
        low, high = m["plausible_range"]
        if low > high:
            errors.append(doc.error(("measures", mid, "plausible_range"), f"plausible range [{low}, {high}] is empty"))
        measures[mid] = OutcomeMeasure(
            id=mid,
            loinc=m["loinc"],
            panels=tuple(m.get("panels", ())),
            unit=m["unit"],
            direction=m["direction"],
            baseline_days=m["baseline_days"],
            followup_min_days=lo,
            followup_max_days=hi,
            threshold=float(m["threshold"]),
            plausible_min=low,  # as written (25, not 25.0), so quality reports quote the YAML
            plausible_max=high,
            episode_gap_days=m["episode_gap_days"],
            description=m.get("description", ""),
        )
    return measures


def _build_control_measures(
    doc: YamlDoc, buckets: dict[str, ConditionBucket], treatments: dict[str, Treatment], errors: list[str]
) -> dict[str, ControlMeasure]:
    out = {}
    for mid, m in doc.data["measures"].items():
        kind = m.get("kind", "change")
        if kind == "change":
            continue
        where = ("measures", mid)
        for i, bid in enumerate(m["buckets"]):
            if bid not in buckets:
                errors.append(doc.error(where + ("buckets", i), f"unknown bucket {bid!r} (conditions.yaml has {', '.join(sorted(buckets))})"))
        if m["untreated_code"] in treatments:
            errors.append(doc.error(where + ("untreated_code",), f"{m['untreated_code']} is a treatment of treatments.yaml"))
        lo, hi = m["age_range"]
        if lo > hi:
            errors.append(doc.error(where + ("age_range",), f"age range [{lo}, {hi}] is empty"))
        readings = []
        for i, r in enumerate(m["readings"]):
            at = where + ("readings", i)
            want = "below" if kind == "control" else "above"
            if want not in r or ({"below", "above"} - {want}) & set(r):
                errors.append(doc.error(at, f"a {kind} reading takes a threshold '{want}' (and not the other)"))
            low, high = r["plausible_range"]
            if low > high:
                errors.append(doc.error(at + ("plausible_range",), f"plausible range [{low}, {high}] is empty"))
            readings.append(ControlReading(r["loinc"], tuple(r.get("panels", ())), r["unit"], r.get("below"),
                                           r.get("above"), low, high))
        exclusions = {
            reason: {CONDITION_SYSTEMS[key]: tuple(codes) for key, codes in lists.items()}
            for reason, lists in m["exclusions"].items()
        }
        out[mid] = ControlMeasure(
            id=mid, kind=kind, source=m["source"], buckets=tuple(m["buckets"]), readings=tuple(readings),
            age_min=lo, age_max=hi, onset_by_month=m["onset_by_month"], lookback_days=m["lookback_days"],
            untreated_code=m["untreated_code"], exclusions=exclusions, description=m.get("description", ""),
        )
    return out


def _build_buckets(
    doc: YamlDoc, measures: dict[str, OutcomeMeasure], errors: list[str]
) -> tuple[dict[str, ConditionBucket], dict[tuple[str, str], str]]:
    buckets, index = {}, {}
    first_seen: dict[tuple[str, str], tuple[str, int]] = {}
    for bid, b in doc.data["buckets"].items():
        for i, mid in enumerate(b["measures"]):
            if mid not in measures:
                known = ", ".join(sorted(measures))
                errors.append(doc.error(("buckets", bid, "measures", i), f"unknown measure {mid!r} (outcomes.yaml has {known})"))
        codes = {}
        for key, code_list in b["codes"].items():
            system = CONDITION_SYSTEMS[key]
            codes[system] = tuple(code_list)
            for i, code in enumerate(code_list):
                path = ("buckets", bid, "codes", key, i)
                matched = (system, match_code(system, code))  # E11.9 and E119 are one code
                if matched in first_seen:
                    other, line = first_seen[matched]
                    errors.append(doc.error(path, f"{key} code {code!r} is already in bucket {other!r} (line {line})"))
                    continue
                first_seen[matched] = (bid, doc.line(path))
                index[matched] = bid
        buckets[bid] = ConditionBucket(bid, b.get("description", ""), codes, tuple(b["measures"]))
    return buckets, index


def _build_treatments(
    doc: YamlDoc, buckets: dict[str, ConditionBucket], errors: list[str]
) -> tuple[dict[str, Treatment], dict[tuple[str, str], str]]:
    treatments, index = {}, {}
    first_seen: dict[str, tuple[str, int]] = {}
    for tid, t in doc.data["treatments"].items():
        for i, bid in enumerate(t["buckets"]):
            if bid not in buckets:
                known = ", ".join(sorted(buckets))
                errors.append(doc.error(("treatments", tid, "buckets", i), f"unknown bucket {bid!r} (conditions.yaml has {known})"))
        for i, code in enumerate(t["rxnorm"]):
            path = ("treatments", tid, "rxnorm", i)
            if code in first_seen:
                other, line = first_seen[code]
                errors.append(doc.error(path, f"rxnorm code {code!r} is already treatment {other} (line {line})"))
                continue
            first_seen[code] = (tid, doc.line(path))
            index[(RXNORM, code)] = tid
        treatments[tid] = Treatment(tid, t["display"], tuple(t["rxnorm"]), tuple(t["buckets"]))
    return treatments, index


def _build_cohorts(doc: YamlDoc, errors: list[str]) -> CohortSpec:
    bands = [_parse_band(text) for text in doc.data["age_bands"]]
    for i, band in enumerate(bands):
        if band.max_years is not None and band.max_years < band.min_years:
            errors.append(doc.error(("age_bands", i), f"age band {band.label!r} ends before it starts"))
    order = sorted(range(len(bands)), key=lambda i: bands[i].min_years)
    for a, b in zip(order, order[1:]):
        prev, cur = bands[a], bands[b]
        prev_end = prev.max_years if prev.max_years is not None else float("inf")
        if cur.min_years <= prev_end:
            errors.append(doc.error(("age_bands", b), f"age band {cur.label!r} overlaps {prev.label!r}"))
        elif cur.min_years != prev_end + 1:
            errors.append(doc.error(("age_bands", b), f"gap between age bands {prev.label!r} and {cur.label!r}"))
    if bands and bands[order[0]].min_years != 0:
        errors.append(doc.error(("age_bands", order[0]), "the youngest age band must start at 0"))
    return CohortSpec(
        age_bands=tuple(bands[i] for i in order),
        sexes=tuple(doc.data["sexes"]),
        period=doc.data.get("period", "year"),
    )
