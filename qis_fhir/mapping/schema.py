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
        }
    },
    "required": ["treatments"],
    "additionalProperties": False,
}

DAYS = {"type": "integer", "minimum": 0, "maximum": 36500}

OUTCOMES_SCHEMA = {
    "type": "object",
    "properties": {
        "measures": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {
                ID: {
                    "type": "object",
                    "properties": {
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
            },
            "additionalProperties": False,
        }
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
