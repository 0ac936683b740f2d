"""``ExtractSummary``: every count of one extraction, nothing identifying (``DIR/extract/summary.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ExtractSummary:
    export_dir: str
    validate: str
    validation_sample_rate: float
    validated: int = 0
    totals: dict[str, int] = field(default_factory=lambda: {"read": 0, "accepted": 0, "quarantined": 0, "skipped": 0})
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)  # read = accepted + quarantined
    skipped_types: dict[str, int] = field(default_factory=dict)  # well-formed resources of types not extracted
    by_file: dict[str, dict[str, int]] = field(default_factory=dict)  # read = accepted + quarantined + skipped
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    dropped_components: dict[str, int] = field(default_factory=dict)  # component values of accepted Observations
    accepted_without_rows: dict[str, int] = field(default_factory=dict)  # accepted, but no numeric value
    ignored_files: int = 0  # files in the export dir that are not FHIR data (LICENSE, a bulk manifest...)
    max_line_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def check_invariants(self) -> None:
        """Raise AssertionError if a count does not add up (a bug, never bad input)."""
        for name, c in self.by_type.items():
            assert c["read"] == c["accepted"] + c["quarantined"], f"type {name}: counts do not add up"
        for name, c in self.by_file.items():
            assert c["read"] == c["accepted"] + c["quarantined"] + c["skipped"], f"file {name}: counts do not add up"
        t = self.totals
        assert t["read"] == t["accepted"] + t["quarantined"] + t["skipped"], "totals do not add up"
        assert t["quarantined"] == sum(self.quarantine_reasons.values()), "quarantine reasons do not add up"
        assert t["skipped"] == sum(self.skipped_types.values()), "skipped types do not add up"
