"""``ExtractSummary``: every count of one extraction, nothing identifying (``DIR/extract/summary.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from qis_fhir.errors import NothingExtractedError


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
    skipped_paths: dict[str, int] = field(default_factory=dict)  # paths not read, by reason (sources.py)
    limits: dict[str, int] = field(default_factory=dict)  # the bounds in force (docs/extract.md, "Bounds")
    caps_hit: dict[str, dict] = field(default_factory=dict)  # file label -> what a limit left out
    quarantine_written: int = 0  # quarantined lines with a record in quarantine.ndjson
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_nothing_extracted(self, quarantine: Path) -> None:
        """The one rule for an export that yielded nothing, for ``qis-fhir extract`` and ``qis-fhir run``
        alike: no resource accepted at all is ``NothingExtractedError`` (exit 6), never a run on zero rows."""
        if self.totals["accepted"] == 0:
            raise NothingExtractedError(
                f"no usable resource in {self.export_dir} ({self.totals['read']} read, all quarantined or skipped): "
                f"see {quarantine}"
            )

    def check_invariants(self) -> None:
        """Raise AssertionError if a count does not add up (a bug, never bad input).

        Explicit raises rather than ``assert``: the check must also run under ``python -O``.
        """
        problems = []
        for name, c in self.by_type.items():
            if c["read"] != c["accepted"] + c["quarantined"]:
                problems.append(f"type {name}: read != accepted + quarantined")
        for name, c in self.by_file.items():
            if c["read"] != c["accepted"] + c["quarantined"] + c["skipped"]:
                problems.append(f"file {name}: read != accepted + quarantined + skipped")
        t = self.totals
        if t["read"] != t["accepted"] + t["quarantined"] + t["skipped"]:
            problems.append("totals: read != accepted + quarantined + skipped")
        if t["quarantined"] != sum(self.quarantine_reasons.values()):
            problems.append("quarantined != sum of quarantine_reasons")
        if t["skipped"] != sum(self.skipped_types.values()):
            problems.append("skipped != sum of skipped_types")
        not_written = sum(sum(c.get("max_quarantine_lines", {}).values()) for c in self.caps_hit.values())
        if t["quarantined"] != self.quarantine_written + not_written:
            problems.append("quarantined != lines with a quarantine record + lines over the record cap")
        if problems:
            raise AssertionError("; ".join(problems))
