"""Clinical codes the synthetic exports use, with the systems and displays Synthea writes.

Kept in one place so the generator, the planted-effects answer key and the tests agree, and so they
can be checked against `mappings/v1/` (the mapping must recognise every code planted here).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    """An outcome measure: where its value sits and how it is distributed before treatment."""

    key: str
    loinc: str
    display: str
    unit: str
    category: str  # FHIR observation-category code: vital-signs or laboratory
    direction: str  # "lower" is better for every measure planted here
    response_threshold: float  # an improvement of at least this much counts as a response
    diagnosed_mean: float  # pre-treatment value in diagnosed patients
    diagnosed_sd: float
    healthy_mean: float  # value in patients without the condition
    healthy_sd: float
    decimals: int
    panel: tuple[str, str] | None = None  # (LOINC, display) of the panel the value is a component of


@dataclass(frozen=True)
class Treatment:
    key: str
    rxnorm: str
    display: str
    tx_code: str  # the anonymised code mappings/v1 gives this RxNorm code (checked by a test)


@dataclass(frozen=True)
class Bucket:
    """A condition bucket: one SNOMED CT condition, its outcome measure and its usual treatments."""

    key: str
    snomed: str
    display: str
    measure: Measure
    treatments: tuple[Treatment, ...]
    min_age_at_onset: int
    base_prevalence: float  # in adults aged 65+, scaled down for younger bands
    untreated_fraction: float = 0.15
    # Other codes of the same bucket some sites write instead: (SNOMED code, display, share).
    alt_code: tuple[str, str, float] | None = None


SBP = Measure(
    key="systolic_bp",
    loinc="8480-6",
    display="Systolic Blood Pressure",
    unit="mm[Hg]",
    category="vital-signs",
    direction="lower",
    response_threshold=10.0,
    diagnosed_mean=152.0,
    diagnosed_sd=11.0,
    healthy_mean=118.0,
    healthy_sd=9.0,
    decimals=1,
    panel=("55284-4", "Blood Pressure"),
)
DBP_LOINC = ("8462-4", "Diastolic Blood Pressure")
# Every total cholesterol comes with an LDL of the same panel, as a lab reports a lipid panel (Synthea
# writes both): mapping v2's lipid_control needs the two on one day. LDL is computed from the total
# by Friedewald (LDL = total - HDL - triglycerides / 5) with a typical HDL of 50 and triglycerides of
# 125 mg/dL, so LDL = total - 75: no random draw, so every other value of an export stays as it was.
LDL_LOINC = ("18262-6", "Low Density Lipoprotein Cholesterol")
LDL_BELOW_TOTAL = 75.0
# Newer Synthea and many EHRs write the "all children optional" panel; both must be read.
BP_PANEL_ALT = ("85354-9", "Blood pressure panel with all children optional")

CHOLESTEROL = Measure(
    key="total_cholesterol",
    loinc="2093-3",
    display="Total Cholesterol",
    unit="mg/dL",
    category="laboratory",
    direction="lower",
    response_threshold=20.0,
    diagnosed_mean=245.0,
    diagnosed_sd=25.0,
    healthy_mean=185.0,
    healthy_sd=20.0,
    decimals=1,
)
HBA1C = Measure(
    key="hba1c",
    loinc="4548-4",
    display="Hemoglobin A1c/Hemoglobin.total in Blood",
    unit="%",
    category="laboratory",
    direction="lower",
    response_threshold=0.5,
    diagnosed_mean=8.3,
    diagnosed_sd=0.9,
    healthy_mean=5.4,
    healthy_sd=0.3,
    decimals=1,
)

HCTZ = Treatment("hydrochlorothiazide", "316049", "Hydrochlorothiazide 25 MG", "TX_0001")
LISINOPRIL = Treatment("lisinopril", "314076", "lisinopril 10 MG Oral Tablet", "TX_0002")
SIMVASTATIN = Treatment("simvastatin", "316672", "Simvistatin 10 MG", "TX_0003")  # Synthea's own spelling
METFORMIN = Treatment(
    "metformin", "860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet", "TX_0005"
)
INSULIN = Treatment(
    "insulin",
    "106892",
    "insulin isophane, human 70 UNT/ML / insulin, regular, human 30 UNT/ML Injectable Suspension [Humulin]",
    "TX_0006",
)

HYPERTENSION = Bucket(
    key="hypertension",
    snomed="38341003",
    display="Hypertension",
    measure=SBP,
    treatments=(HCTZ, LISINOPRIL),
    min_age_at_onset=40,  # younger hypertensives are only the planted rare cohort
    base_prevalence=0.45,
    alt_code=("59621000", "Essential hypertension (disorder)", 0.15),  # US Core Synthea exports
)
HYPERLIPIDEMIA = Bucket(
    key="hyperlipidemia",
    snomed="55822004",
    display="Hyperlipidemia",
    measure=CHOLESTEROL,
    treatments=(SIMVASTATIN,),
    min_age_at_onset=25,
    base_prevalence=0.30,
)
DIABETES_T2 = Bucket(
    key="type2_diabetes",
    snomed="44054006",
    display="Diabetes",
    measure=HBA1C,
    treatments=(METFORMIN, INSULIN),
    min_age_at_onset=25,
    base_prevalence=0.20,
)

BUCKETS: tuple[Bucket, ...] = (HYPERTENSION, HYPERLIPIDEMIA, DIABETES_T2)

# Routine vital signs that carry no outcome: they make exports big cheaply without touching any
# planted baseline or follow-up (no BP, cholesterol or HbA1c among them).
HEART_RATE = ("8867-4", "Heart rate", "/min", 74.0, 10.0)
BODY_WEIGHT = ("29463-7", "Body Weight", "kg", 80.0, 15.0)
BODY_HEIGHT = ("8302-2", "Body Height", "cm", 170.0, 9.0)
BMI = ("39156-5", "Body Mass Index", "kg/m2", 27.0, 4.0)
RESP_RATE = ("9279-1", "Respiratory rate", "/min", 14.0, 2.0)
ROUTINE_VITALS = (HEART_RATE, BODY_WEIGHT, BMI, BODY_HEIGHT, RESP_RATE)

# Age bands (whole years at treatment start) as in mappings/v1/cohorts.yaml:
# (label, lowest age, highest age or None for open-ended).
AGE_BANDS: tuple[tuple[str, int, int | None], ...] = (
    ("0-17", 0, 17),
    ("18-39", 18, 39),
    ("40-64", 40, 64),
    ("65+", 65, None),
)


def age_band(age_years: float) -> str:
    for label, lo, hi in AGE_BANDS:
        if age_years >= lo and (hi is None or age_years < hi + 1):
            return label
    return "unknown"
