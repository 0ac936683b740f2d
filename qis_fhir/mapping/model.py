"""The loaded mapping set: plain frozen dataclasses, no YAML or schema logic.

A ``MappingSet`` is what every later stage reads: it turns source codes (SNOMED CT, ICD-10-CM,
RxNorm, LOINC) into condition buckets, anonymised treatment codes and outcome measures, and it
carries the version and content hash that every derived row records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qis_fhir.fhir.systems import ICD10CM, LOINC, RXNORM, SNOMED  # noqa: F401  (re-exported by qis_fhir.mapping)

if TYPE_CHECKING:
    import pandas as pd


#: YAML key of a code list -> FHIR system URI it matches
CONDITION_SYSTEMS: dict[str, str] = {"snomed": SNOMED, "icd10cm": ICD10CM}

UNKNOWN = "unknown"


def match_code(system: str, code: str) -> str:
    """The form a condition code is matched in: ICD-10-CM without its dot, upper case, trimmed.

    HL7 writes ICD-10-CM codes with the dot (``E11.9``), but exports in the field also send ``E119``
    or ``e11.9``: all three are one code. SNOMED CT codes are digits and match as they are.
    """
    if system == ICD10CM:
        return code.strip().upper().replace(".", "")
    return code


def match_codes(systems: pd.Series, codes: pd.Series) -> pd.Series:
    """``match_code`` over two columns, vectorised for the ICD-10-CM rows only."""
    out = codes.astype(object).copy()
    icd = (systems == ICD10CM).to_numpy()
    if icd.any():
        out[icd] = codes[icd].astype(str).str.strip().str.upper().str.replace(".", "", regex=False).to_numpy()
    return out


@dataclass(frozen=True)
class ConditionBucket:
    """A group of condition codes treated as one clinical condition, and the measures judging it."""

    id: str
    description: str
    codes: dict[str, tuple[str, ...]]  # FHIR system URI -> codes
    measures: tuple[str, ...]


@dataclass(frozen=True)
class Treatment:
    """RxNorm codes that count as one treatment. ``display`` stays on site: packets carry only ``id``."""

    id: str  # "TX_..."
    display: str
    rxnorm: tuple[str, ...]
    buckets: tuple[str, ...]


@dataclass(frozen=True)
class OutcomeMeasure:
    """How one outcome is measured around a treatment start (see docs/outcomes.md)."""

    id: str
    loinc: str
    panels: tuple[str, ...]
    unit: str  # UCUM code; values in any other unit are excluded, never converted
    direction: str  # "lower" or "higher" is better
    baseline_days: int  # baseline window: [start - baseline_days, start] in calendar days
    followup_min_days: int  # follow-up window: [start + min, start + max]
    followup_max_days: int
    threshold: float  # response: change of at least this much in the good direction
    plausible_min: float  # physiologically possible range, both ends inclusive, in ``unit``: readings
    plausible_max: float  # outside it are never a baseline or follow-up (quality.yaml reads it too)
    episode_gap_days: int  # requests closer than this continue one episode
    description: str = ""


@dataclass(frozen=True)
class ControlReading:
    """One reading a control measure judges: a LOINC code alone or in a panel, and its threshold."""

    loinc: str
    panels: tuple[str, ...]
    unit: str  # UCUM; readings in another unit are never used
    below: float | None  # control: the reading is controlled when strictly under this
    above: float | None  # poor_control: the reading is poor control when strictly over this
    plausible_min: float
    plausible_max: float


@dataclass(frozen=True)
class ControlMeasure:
    """A per-year control measure (kind ``control``, modelled on CMS165, or ``poor_control``, on
    CMS122): one unit per patient x measurement year x treatment (docs/outcomes.md)."""

    id: str
    kind: str  # "control" (higher share is better) or "poor_control" (lower share is better)
    source: str  # the published measure it is modelled on
    buckets: tuple[str, ...]
    readings: tuple[ControlReading, ...]  # the first is the index value the mean and SD describe
    age_min: int  # age in whole years on the last day of the year, both ends inclusive
    age_max: int
    onset_by_month: int  # the condition's onset is on or before the last day of this month
    lookback_days: int  # a treatment request counts when authored this many days before the index day
    untreated_code: str
    exclusions: dict[str, dict[str, tuple[str, ...]]]  # reason -> FHIR system URI -> codes, in order
    description: str = ""

    @property
    def direction(self) -> str:
        """Which way the numerator share is better: ``higher`` for control, ``lower`` for poor control."""
        return "higher" if self.kind == "control" else "lower"


@dataclass(frozen=True)
class AgeBand:
    """Whole years, both ends inclusive; ``max_years`` None = open-ended (``65+``)."""

    label: str
    min_years: int
    max_years: int | None

    def contains(self, age_years: int) -> bool:
        return age_years >= self.min_years and (self.max_years is None or age_years <= self.max_years)


@dataclass(frozen=True)
class CohortSpec:
    """Cohort dimensions packets are cut by, and the period granularity packets aggregate over."""

    age_bands: tuple[AgeBand, ...]
    sexes: tuple[str, ...]
    period: str = "year"  # month | quarter | year

    @property
    def band_values(self) -> tuple[str, ...]:
        """Every age band an event can carry: the bands' labels, then ``unknown`` (age missing or outside them)."""
        return tuple(dict.fromkeys([*(b.label for b in self.age_bands), UNKNOWN]))

    @property
    def sex_values(self) -> tuple[str, ...]:
        """Every sex an event can carry: the mapping's sexes, then ``unknown`` (missing or another value)."""
        return tuple(dict.fromkeys([*self.sexes, UNKNOWN]))

    def age_band(self, age_years: float | None) -> str:
        if age_years is None or (isinstance(age_years, float) and math.isnan(age_years)) or age_years < 0:
            return UNKNOWN
        years = int(math.floor(age_years))
        for band in self.age_bands:
            if band.contains(years):
                return band.label
        return UNKNOWN


@dataclass(frozen=True)
class MappingSet:
    version: str
    description: str
    content_hash: str
    path: Path
    buckets: dict[str, ConditionBucket]
    treatments: dict[str, Treatment]
    measures: dict[str, OutcomeMeasure]  # the change measures (outcome events, packets)
    cohorts: CohortSpec
    control_measures: dict[str, ControlMeasure] = field(default_factory=dict)  # per-year control units
    # class name -> RxNorm codes of that treatment class, mapped or not (unmapped ones are counted)
    treatment_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # new-user washout of every change measure: no request of the treatment in the washout_days
    # before the start and at least that much recorded history; None (mapping v1) = every episode
    # start is a treatment start
    washout_days: int | None = None
    _condition_index: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _treatment_index: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    def bucket_for(self, system: str | None, code: str | None) -> str | None:
        """Bucket id of a condition coding, or None when the mapping does not cover it."""
        system = system or ""
        return self._condition_index.get((system, match_code(system, code or "")))

    def treatment_for(self, system: str | None, code: str | None) -> str | None:
        """``TX_...`` code of a medication coding (RxNorm), or None."""
        return self._treatment_index.get((system or "", code or ""))

    def age_band(self, age_years: float | None) -> str:
        return self.cohorts.age_band(age_years)

    # Vectorised lookups for the outcomes stage (pandas is imported lazily: the DHT node loads mappings too)
    def with_buckets(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``df`` (with ``code_system`` and ``code`` columns) whose coding the mapping covers,
        with their ``bucket`` (a row per bucket); codes are compared in ``match_code`` form."""
        keyed = df.assign(_match=match_codes(df["code_system"], df["code"]))
        table = _index_table(self._condition_index, ["code_system", "_match", "bucket"])
        return keyed.merge(table, on=["code_system", "_match"], how="inner").drop(columns="_match")

    def treatment_code_table(self) -> pd.DataFrame:
        """Columns code_system, code, treatment_code: one row per mapped RxNorm code."""
        return _index_table(self._treatment_index, ["code_system", "code", "treatment_code"])


def _index_table(index: dict[tuple[str, str], str], columns: list[str]) -> pd.DataFrame:
    """A (system, code) -> id index as a three-column object DataFrame, one row per entry."""
    import pandas as pd

    return pd.DataFrame([(s, c, v) for (s, c), v in index.items()], columns=columns).astype("object")
