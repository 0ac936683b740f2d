"""JSON Schemas of the mapping files (one per file) and the checks that need more than one file.

The schemas are data so that ``docs/mappings.md`` can describe them and tests can exercise every
branch. Codes must be quoted strings: an unquoted ``0123`` is an int to YAML and would lose digits.
"""

from __future__ import annotations

CODE = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9.\-]*$"}
CODE_LIST = {"type": "array", "items": CODE, "minItems": 1, "uniqueItems": True}
ID = r"^[a-z][a-z0-9_]*$"
TX_ID = r"^TX_[A-Z0-9_]+$"

MAPPING_SCHEMA = {
    "type": "object",
    "properties": {
        "version": {"type": "string", "pattern": r"^v[0-9][0-9A-Za-z._-]*$"},
        "description": {"type": "string"},
    },
    "required": ["version"],
    "additionalProperties": False,
}

CONDITIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "buckets": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {
                ID: {
                    "type": "object",
                    "properties": {
                        "description": {"type": "string"},
                        "codes": {
                            "type": "object",
                            "properties": {"snomed": CODE_LIST, "icd10cm": CODE_LIST},
                            "additionalProperties": False,
                            "minProperties": 1,
                        },
                        "measures": {
                            "type": "array",
                            "items": {"type": "string", "pattern": ID},
                            "minItems": 1,
                            "uniqueItems": True,
                        },
                    },
                    "required": ["codes", "measures"],
                    "additionalProperties": False,
                }
            },
            "additionalProperties": False,
        }
    },
    "required": ["buckets"],
    "additionalProperties": False,
}

TREATMENTS_SCHEMA = {
    "type": "object",
    "properties": {
        "treatments": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {
                TX_ID: {
                    "type": "object",
                    "properties": {
                        "display": {"type": "string", "minLength": 1},
                        "rxnorm": CODE_LIST,
                        "buckets": {
                            "type": "array",
                            "items": {"type": "string", "pattern": ID},
                            "minItems": 1,
                            "uniqueItems": True,
                        },
                    },
                    "required": ["display", "rxnorm", "buckets"],
                    "additionalProperties": False,
                }
            },
            "additionalProperties": False,
        },
        # class name -> RxNorm codes of a treatment class, mapped or not: the outcome summary counts
        # how often the class's codes occur unmapped (docs/mappings.md)
        "treatment_classes": {
            "type": "object",
            "patternProperties": {ID: CODE_LIST},
            "additionalProperties": False,
        },
    },
    "required": ["treatments"],
    "additionalProperties": False,
}

DAYS = {"type": "integer", "minimum": 0, "maximum": 36500}

CHANGE_MEASURE = {
    "type": "object",
    "properties": {
        "kind": {"const": "change"},
        "description": {"type": "string"},
        "loinc": CODE,
        "panels": {"type": "array", "items": CODE, "uniqueItems": True},
        "unit": {"type": "string", "minLength": 1},
        "direction": {"enum": ["lower", "higher"]},
        "baseline_days": DAYS,
        # follow-up starts at day 1 or later: the start day itself belongs to the baseline
        "followup_days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 36500},
            "minItems": 2,
            "maxItems": 2,
        },
        "threshold": {"type": "number", "exclusiveMinimum": 0},
        # [min, max] in the measure's unit: readings outside it are never used
        "plausible_range": {
            "type": "array",
            "items": {"type": "number"},
            "minItems": 2,
            "maxItems": 2,
        },
        "episode_gap_days": {"type": "integer", "minimum": 1, "maximum": 36500},
    },
    "required": [
        "loinc",
        "unit",
        "direction",
        "baseline_days",
        "followup_days",
        "threshold",
        "plausible_range",
        "episode_gap_days",
    ],
    "additionalProperties": False,
}

CONTROL_KINDS = ("control", "poor_control")
RANGE = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}

# one reading of a control measure: a LOINC code (alone or in one of the panels) and its threshold;
# `below` for control (every reading of the index day under it), `above` for poor_control (a reading
# over it, or none, is poor control)
CONTROL_READING = {
    "type": "object",
    "properties": {
        "loinc": CODE,
        "panels": {"type": "array", "items": CODE, "uniqueItems": True},
        "unit": {"type": "string", "minLength": 1},
        "below": {"type": "number"},
        "above": {"type": "number"},
        "plausible_range": RANGE,
    },
    "required": ["loinc", "unit", "plausible_range"],
    "additionalProperties": False,
}

CONTROL_MEASURE = {
    "type": "object",
    "properties": {
        "kind": {"enum": list(CONTROL_KINDS)},
        "description": {"type": "string"},
        "source": {"type": "string", "minLength": 1},  # the published measure it is modelled on
        "buckets": {"type": "array", "items": {"type": "string", "pattern": ID}, "minItems": 1, "uniqueItems": True},
        "readings": {"type": "array", "items": CONTROL_READING, "minItems": 1},
        "age_range": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 150},
                      "minItems": 2, "maxItems": 2},
        # the condition counts when its onset is on or before the last day of this month of the year
        "onset_by_month": {"type": "integer", "minimum": 1, "maximum": 12},
        "lookback_days": DAYS,
        "untreated_code": {"type": "string", "pattern": TX_ID},
        "exclusions": {
            "type": "object",
            "patternProperties": {
                ID: {
                    "type": "object",
                    "properties": {"snomed": CODE_LIST, "icd10cm": CODE_LIST},
                    "additionalProperties": False,
                    "minProperties": 1,
                }
            },
            "additionalProperties": False,
        },
    },
    "required": ["kind", "source", "buckets", "readings", "age_range", "onset_by_month", "lookback_days",
                 "untreated_code", "exclusions"],
    "additionalProperties": False,
}

OUTCOMES_SCHEMA = {
    "type": "object",
    "properties": {
        "measures": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {
                # `kind` says which design: change (the default, mapping v1) or a control kind
                ID: {
                    "if": {"type": "object", "required": ["kind"],
                           "properties": {"kind": {"enum": list(CONTROL_KINDS)}}},
                    "then": CONTROL_MEASURE,
                    "else": CHANGE_MEASURE,
                }
            },
            "additionalProperties": False,
        },
        # new-user design, one washout for every change measure of the set: no request of the
        # treatment in the washout_days before the start, and at least washout_days of recorded
        # history before it. Absent = every episode start counts (mapping v1, whose files and so
        # whose meaning are frozen by their hash; v2 writes 365)
        "washout_days": {"type": "integer", "minimum": 1, "maximum": 36500},
    },
    "required": ["measures"],
    "additionalProperties": False,
}

AGE_BAND_PATTERN = r"^([0-9]{1,3})(?:-([0-9]{1,3})|\+)$"

COHORTS_SCHEMA = {
    "type": "object",
    "properties": {
        "age_bands": {
            "type": "array",
            "items": {"type": "string", "pattern": AGE_BAND_PATTERN},
            "minItems": 1,
            "uniqueItems": True,
        },
        "sexes": {
            "type": "array",
            "items": {"enum": ["female", "male", "other", "unknown"]},
            "minItems": 1,
            "uniqueItems": True,
        },
        "period": {"enum": ["month", "quarter", "year"]},
    },
    "required": ["age_bands", "sexes"],
    "additionalProperties": False,
}

#: file name -> schema; every mapping set must hold these files
SCHEMAS: dict[str, dict] = {
    "mapping.yaml": MAPPING_SCHEMA,
    "conditions.yaml": CONDITIONS_SCHEMA,
    "treatments.yaml": TREATMENTS_SCHEMA,
    "outcomes.yaml": OUTCOMES_SCHEMA,
    "cohorts.yaml": COHORTS_SCHEMA,
}
