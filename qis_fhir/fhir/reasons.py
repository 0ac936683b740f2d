"""Quarantine reasons and the exception that carries one out of the field extraction.

A ``Reject`` holds a reason code and a detail written by this package. Details name the *field*
that failed, never its *value*: a resource may hold identifiers, names or free text.
"""

from __future__ import annotations

# line-level: the bytes never became a resource
CORRUPT_FILE = "corrupt_file"  # a gzip stream that is truncated or damaged: the rest of the file is unreadable
NOT_UTF8 = "not_utf8"
LINE_TOO_LONG = "line_too_long"
BLANK_LINE = "blank_line"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
WRONG_RESOURCE_TYPE = "wrong_resource_type"
# field-level: a value the pipeline reads is absent or malformed
MISSING_ID = "missing_id"
MISSING_SUBJECT = "missing_subject"
INVALID_REFERENCE = "invalid_reference"
MISSING_CODE = "missing_code"
MISSING_DATE = "missing_date"
UNPARSEABLE_DATE = "unparseable_date"
DATE_OUT_OF_RANGE = "date_out_of_range"  # a valid FHIR date before 1850 or in the future (dates.py)
MISSING_UNIT = "missing_unit"
UNKNOWN_UNIT = "unknown_unit"
MISSING_VALUE = "missing_value"
INVALID_VALUE = "invalid_value"
INVALID_FIELD = "invalid_field"
# model-level: fhir.resources R4B rejected a resource the strict checks accepted
MODEL_VALIDATION_FAILED = "model_validation_failed"
# file-level: bounds and access (docs/extract.md, "Bounds")
UNREADABLE_FILE = "unreadable_file"  # the file could not be opened: counted as one line 0
TOO_MANY_ENTRIES = "too_many_entries"  # a Bundle entry beyond the per-Bundle entry cap: counted, not read

ALL_REASONS: tuple[str, ...] = (
    CORRUPT_FILE,
    NOT_UTF8,
    LINE_TOO_LONG,
    BLANK_LINE,
    INVALID_JSON,
    NOT_AN_OBJECT,
    WRONG_RESOURCE_TYPE,
    MISSING_ID,
    MISSING_SUBJECT,
    INVALID_REFERENCE,
    MISSING_CODE,
    MISSING_DATE,
    UNPARSEABLE_DATE,
    DATE_OUT_OF_RANGE,
    MISSING_UNIT,
    UNKNOWN_UNIT,
    MISSING_VALUE,
    INVALID_VALUE,
    INVALID_FIELD,
    MODEL_VALIDATION_FAILED,
    UNREADABLE_FILE,
    TOO_MANY_ENTRIES,
)


class Reject(Exception):
    """A resource (or one of its component values) cannot be used; ``detail`` never quotes input."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
