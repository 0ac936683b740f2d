"""Planted treatment effects and site profiles: the answer key the evidence stage must recover.

A cohort is bucket x treatment x age band (at treatment start) x sex. Its planted change
(follow-up minus baseline of the bucket's outcome measure) is normal with the mean and SD below.
The RARE cohort is a small group where the usual first-line treatment fails: hypertensive women aged
18-39 on hydrochlorothiazide (mean change ~0). It is a few percent of a site's hypertensive patients, so
one site alone stays under the minimum cell size (11) while about five sites pooled exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qis_fhir.synth.catalogue import (
    DIABETES_T2,
    HCTZ,
    HYPERLIPIDEMIA,
    HYPERTENSION,
    INSULIN,
    LISINOPRIL,
    METFORMIN,
    SIMVASTATIN,
    Bucket,
    Treatment,
)


@dataclass(frozen=True)
class Effect:
    """Mean change and SD for a treatment, with additive shifts by age band and sex."""

    mean: float
    sd: float
    age_shift: dict[str, float] = field(default_factory=dict)
    sex_shift: dict[str, float] = field(default_factory=dict)

    def for_cohort(self, band: str, sex: str) -> tuple[float, float]:
        return self.mean + self.age_shift.get(band, 0.0) + self.sex_shift.get(sex, 0.0), self.sd


# Treatment key -> planted effect. Negative = the measure falls (improves: every measure here is
# "lower is better"). Magnitudes are of the order reported for these drugs, not exact trial figures.
EFFECTS: dict[str, Effect] = {
    HCTZ.key: Effect(-12.0, 8.0, age_shift={"65+": -2.0}, sex_shift={"female": -1.0}),
    LISINOPRIL.key: Effect(-15.0, 9.0, age_shift={"65+": 3.0}),
    SIMVASTATIN.key: Effect(-40.0, 18.0, age_shift={"65+": 5.0}, sex_shift={"female": 3.0}),
    METFORMIN.key: Effect(-0.8, 0.45, age_shift={"65+": 0.2}),
    INSULIN.key: Effect(-1.3, 0.6),
}

# Drift of diagnosed but untreated patients between two measurements about a year apart.
UNTREATED_DRIFT: dict[str, Effect] = {
    HYPERTENSION.key: Effect(1.0, 7.0),
    HYPERLIPIDEMIA.key: Effect(2.0, 12.0),
    DIABETES_T2.key: Effect(0.2, 0.4),
}


@dataclass(frozen=True)
class RareCohort:
    bucket: Bucket
    treatment: Treatment
    age_band: str
    age_min: int
    age_max: int
    sex: str
    effect: Effect


RARE = RareCohort(
    bucket=HYPERTENSION,
    treatment=HCTZ,
    age_band="18-39",
    age_min=18,
    age_max=39,
    sex="female",
    effect=Effect(0.5, 6.0),  # non-responders: thiazide does nothing for this group
)


def planted_effect(bucket: Bucket, treatment: Treatment | None, band: str, sex: str) -> tuple[float, float]:
    """(mean, sd) of the planted change for one cohort; ``treatment=None`` means untreated."""
    if treatment is None:
        return UNTREATED_DRIFT[bucket.key].for_cohort(band, sex)
    if (bucket.key, treatment.key, band, sex) == rare_key():
        return RARE.effect.mean, RARE.effect.sd
    return EFFECTS[treatment.key].for_cohort(band, sex)


def rare_key() -> tuple[str, str, str, str]:
    return (RARE.bucket.key, RARE.treatment.key, RARE.age_band, RARE.sex)


def expected_responder_fraction(mean: float, sd: float, threshold: float) -> float:
    """P(change <= -threshold) for a normal change: the share who improve by at least the threshold."""
    if sd <= 0:
        return 1.0 if mean <= -threshold else 0.0
    z = (-threshold - mean) / sd
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's population differs: age mix, prevalence, prescribing habits.

    ``age_mix`` is (min age, max age, weight) of the *current* age; ``rare_rate`` is the chance per
    patient of belonging to the rare cohort (about 1 in 125: 4 at a 500-patient site, 8 at 1,000, so
    one site of up to ~1,200 patients cannot publish it alone while five sites pooled can).
    """

    name: str
    age_mix: tuple[tuple[int, int, float], ...]
    prevalence: dict[str, float]  # bucket key -> multiplier of Bucket.base_prevalence
    second_line_share: dict[str, float]  # bucket key -> share on the bucket's second treatment
    female_share: float
    rare_rate: float
    description: str


PROFILES: dict[str, SiteProfile] = {
    "default": SiteProfile(
        "default",
        ((0, 17, 0.15), (18, 39, 0.28), (40, 64, 0.33), (65, 95, 0.24)),
        {HYPERTENSION.key: 1.0, HYPERLIPIDEMIA.key: 1.0, DIABETES_T2.key: 1.0},
        {HYPERTENSION.key: 0.5, DIABETES_T2.key: 0.3},
        0.51,
        0.008,
        "a general hospital",
    ),
    "urban": SiteProfile(
        "urban",
        ((0, 17, 0.14), (18, 39, 0.36), (40, 64, 0.32), (65, 95, 0.18)),
        {HYPERTENSION.key: 0.95, HYPERLIPIDEMIA.key: 1.05, DIABETES_T2.key: 1.1},
        {HYPERTENSION.key: 0.6, DIABETES_T2.key: 0.35},
        0.52,
        0.009,
        "younger city population, more ACE inhibitors",
    ),
    "rural": SiteProfile(
        "rural",
        ((0, 17, 0.17), (18, 39, 0.22), (40, 64, 0.34), (65, 95, 0.27)),
        {HYPERTENSION.key: 1.15, HYPERLIPIDEMIA.key: 1.1, DIABETES_T2.key: 1.0},
        {HYPERTENSION.key: 0.35, DIABETES_T2.key: 0.25},
        0.50,
        0.007,
        "older, more hypertension, thiazides first",
    ),
    "elderly": SiteProfile(
        "elderly",
        ((0, 17, 0.04), (18, 39, 0.14), (40, 64, 0.34), (65, 95, 0.48)),
        {HYPERTENSION.key: 1.05, HYPERLIPIDEMIA.key: 1.0, DIABETES_T2.key: 1.05},
        {HYPERTENSION.key: 0.5, DIABETES_T2.key: 0.4},
        0.55,
        0.006,
        "a geriatric centre",
    ),
    "young": SiteProfile(
        "young",
        ((0, 17, 0.25), (18, 39, 0.38), (40, 64, 0.27), (65, 95, 0.10)),
        {HYPERTENSION.key: 0.9, HYPERLIPIDEMIA.key: 0.9, DIABETES_T2.key: 0.95},
        {HYPERTENSION.key: 0.55, DIABETES_T2.key: 0.3},
        0.50,
        0.010,
        "a young suburban population",
    ),
}
