"""Synthetic FHIR bulk exports with planted treatment effects.

One pass, one patient at a time: every resource is serialised and written as soon as it is made, and
only per-cohort running sums are kept, so memory is flat whether the export has 100 or 2 million
Observations. One ``random.Random(seed)`` drives everything in a fixed order, so a seed gives the same
bytes on every run (``random.Random``'s ``random()`` and ``getrandbits()`` streams are stable across
Python versions; nothing here depends on the clock, the host or dict ordering of external data).

The answer key (``planted_effects.json``) is written *beside* the export folder, never inside it: a
hospital's export would not contain it, and a pipeline reading the folder must not see it.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from qis_fhir.errors import AlreadyExistsError, ExitCode, QisError
from qis_fhir.fhir.systems import RXNORM, SNOMED
from qis_fhir.synth import catalogue as cat
from qis_fhir.synth import names
from qis_fhir.synth import resources as fhir
from qis_fhir.synth.effects import (
    EFFECTS,
    PROFILES,
    RARE,
    UNTREATED_DRIFT,
    SiteProfile,
    expected_responder_fraction,
    planted_effect,
    rare_key,
)
from qis_fhir.synth.writer import ExportWriter

GENERATOR_VERSION = "1"
TRUTH_SCHEMA = "qis-fhir/synth-planted-effects/1"
REFERENCE_DATE = datetime(2026, 6, 30, tzinfo=UTC)  # "today" of every export (fixed: same bytes any day)
REFERENCE_TS = int(REFERENCE_DATE.timestamp())
DAY = 86_400
YEAR = 365.25 * DAY
# Treatment starts (and untreated patients' diagnoses) fall in whole calendar years ending with
# LAST_START_YEAR; by default one year. Packets aggregate per period (mappings/v1: one year), so a
# one-year window keeps every planted cohort in a single cell per site, which is what makes "the rare
# cohort is under the minimum cell size at one site but not pooled over five" hold per packet cell.
LAST_START_YEAR = REFERENCE_DATE.year - 2  # leaves room for every follow-up before REFERENCE_DATE
MAX_START_YEARS = 20


def start_window(start_years: int) -> tuple[int, int]:
    """[first, last) timestamps of the treatment-start window for ``start_years`` calendar years."""
    first = datetime(LAST_START_YEAR - start_years + 1, 1, 1, tzinfo=UTC)
    end = datetime(LAST_START_YEAR + 1, 1, 1, tzinfo=UTC)
    return int(first.timestamp()), int(end.timestamp())

# Timeline of a treated patient (days relative to the first MedicationRequest).
BASELINE_DAYS = (1.0, 120.0)  # baseline this many days before the start (v1 window: 180 days)
DIAGNOSIS_VALUE_MIN_DAYS = 200.0  # a diagnosis-day value only when older than any baseline window
FOLLOWUP_DAYS = (90.0, 300.0)  # one follow-up measurement: inside every v1 window ([28|42|84, 400])
LATE_DAYS = (450.0, 700.0)  # a later check, outside every v1 follow-up window (<= 400 days)
REFILL_DAYS = (80.0, 100.0)  # MedicationRequest refills
REFILL_SPAN_DAYS = 720.0
MISSING_FOLLOWUP_RATE = 0.08  # treated patients whose follow-up never happened
REASON_REFERENCE_RATE = 0.85  # episodes whose MedicationRequests point at the Condition

CLIP = {
    cat.SBP.key: (85.0, 240.0),
    cat.CHOLESTEROL.key: (100.0, 400.0),
    cat.HBA1C.key: (4.0, 15.0),
}
COHORT_BANDS = ("18-39", "40-64", "65+")
SEXES = ("female", "male")
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _uuid4(h: str) -> str:
    """32 hex digits shaped as a version-4 UUID, as Synthea's resource ids are."""
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def _derived_id(oid: str) -> str:
    """A second resource id derived from ``oid`` (sha256), drawing nothing from the RNG."""
    return _uuid4(hashlib.sha256(oid.encode()).hexdigest())


@dataclass
class SynthResult:
    """What ``generate_export`` wrote."""

    out_dir: Path
    counts: dict[str, int]  # resource type -> lines written
    truth_path: Path  # the planted-effects answer key (outside out_dir)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Acc:
    """Running sums of realised changes for one cohort (never per-patient data)."""

    patients: int = 0
    complete: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    responders: int = 0

    def add(self, change: float | None, threshold: float) -> None:
        self.patients += 1
        if change is None:
            return
        self.complete += 1
        self.total += change
        self.total_sq += change * change
        if change <= -threshold:
            self.responders += 1

    def as_dict(self) -> dict[str, Any]:
        n = self.complete
        mean = self.total / n if n else None
        sd = None
        if n > 1:
            var = (self.total_sq - n * mean * mean) / (n - 1)  # type: ignore[operator]
            sd = math.sqrt(max(var, 0.0))
        return {
            "patients": self.patients,
            "with_baseline_and_followup": n,
            "mean_change": None if mean is None else round(mean, 6),
            "sd_change": None if sd is None else round(sd, 6),
            "responders": self.responders,
        }


def default_truth_path(out_dir: Path) -> Path:
    """``<out_dir>.truth.json`` beside the export folder (``exports/site-a`` -> ``exports/site-a.truth.json``)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".truth.json")


def generate_export(
    out_dir: Path | str,
    *,
    patients: int,
    seed: int,
    observations: int | None = None,
    site_profile: str = "default",
    progress: bool = False,
    truth_path: Path | str | None = None,
    max_lines_per_file: int = 100_000,
    gzip: bool = False,
    encounters: bool = True,
    overwrite: bool = False,
    start_years: int = 1,
    rare_patients: int | None = None,
) -> SynthResult:
    """Write a synthetic FHIR R4 bulk export to ``out_dir`` and its answer key to ``truth_path``.

    ``observations``: pad with routine vital signs (no outcome codes, so no planted value moves) until
    the export holds about that many Observation lines; ``None`` writes only a realistic handful per
    patient. ``max_lines_per_file`` splits each type into ``.000``, ``.001``... parts. ``truth_path``
    defaults to ``default_truth_path(out_dir)`` and may not lie inside ``out_dir``. ``start_years``:
    treatment starts fall in that many calendar years ending with ``LAST_START_YEAR`` (default one
    year, so each planted cohort is one packet cell per site; use 10 for a long, realistic history).
    ``rare_patients``: size of the rare cohort; default ``round(profile.rare_rate * patients)``.
    """
    if patients < 1:
        raise QisError("--patients must be at least 1", exit_code=ExitCode.USAGE)
    if observations is not None and observations < 0:
        raise QisError("--observations must not be negative", exit_code=ExitCode.USAGE)
    if max_lines_per_file < 1:
        raise QisError("max_lines_per_file must be at least 1", exit_code=ExitCode.USAGE)
    if rare_patients is not None and not 0 <= rare_patients <= patients:
        raise QisError("--rare-patients must be between 0 and --patients", exit_code=ExitCode.USAGE)
    if not 1 <= start_years <= MAX_START_YEARS:
        raise QisError(f"--start-years must be between 1 and {MAX_START_YEARS}", exit_code=ExitCode.USAGE)
    profile = PROFILES.get(site_profile)
    if profile is None:
        raise QisError(
            f"unknown site profile {site_profile!r}; choose one of {', '.join(sorted(PROFILES))}",
            exit_code=ExitCode.USAGE,
        )
    out = Path(out_dir)
    truth = Path(truth_path) if truth_path is not None else default_truth_path(out)
    out.mkdir(parents=True, exist_ok=True)
    if truth.resolve().parent == out.resolve() or out.resolve() in truth.resolve().parents:
        raise QisError(
            "the planted-effects file must not be written inside the export folder",
            exit_code=ExitCode.USAGE,
        )
    existing = sorted(p for p in out.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    if existing:
        if not overwrite:
            raise AlreadyExistsError(
                f"{out} already holds {len(existing)} NDJSON file(s); choose an empty folder or overwrite"
            )
        for p in existing:
            p.unlink()

    started = time.perf_counter()
    gen = _Generator(out, seed=seed, profile=profile, max_lines=max_lines_per_file, gzip_output=gzip,
                     encounters=encounters, start_years=start_years)
    n_rare = round(profile.rare_rate * patients) if rare_patients is None else rare_patients
    try:
        gen.run(patients, observations, progress, n_rare)
    finally:
        gen.writer.close()
    seconds = time.perf_counter() - started
    counts = gen.writer.counts()
    truth.parent.mkdir(parents=True, exist_ok=True)
    truth.write_bytes(
        orjson.dumps(
            gen.truth(patients=patients, observations_target=observations, counts=counts,
                      files=[p.name for p in gen.writer.files()], max_lines=max_lines_per_file, gzip=gzip),
            option=orjson.OPT_INDENT_2,
        )
        + b"\n"
    )
    return SynthResult(out_dir=out, counts=counts, truth_path=truth, files=gen.writer.files(), seconds=seconds)


class _Generator:
    def __init__(self, out: Path, *, seed: int, profile: SiteProfile, max_lines: int, gzip_output: bool,
                 encounters: bool, start_years: int) -> None:
        self.start_years = start_years
        self.window = start_window(start_years)
        # Two independent streams: padding to --observations draws only from its own, so an export
        # with padding has exactly the clinical content (and answer key) of the one without.
        # String seeds are hashed with SHA-512 by random.Random: stable across Python versions, and
        # unlike int seeds they keep -1 and 1 apart.
        self.rng = random.Random(f"qis-fhir-synth/{seed}/clinical")
        self.pad_rng = random.Random(f"qis-fhir-synth/{seed}/padding")
        self.seed = seed
        self.profile = profile
        self.encounters = encounters
        self.writer = ExportWriter(out, max_lines, gzip_output)
        self.w_patient = self.writer.writer("Patient")
        self.w_condition = self.writer.writer("Condition")
        self.w_medreq = self.writer.writer("MedicationRequest")
        self.w_obs = self.writer.writer("Observation")
        self.w_enc = self.writer.writer("Encounter") if encounters else None
        self.templates = fhir.VitalTemplates()
        self.acc: dict[tuple[str, str, str, str], _Acc] = {}
        self.noise = {"diastolic_without_unit": 0, "systolic_without_unit": 0, "cholesterol_mmol_per_l": 0,
                      "weight_lb": 0, "bp_panels_85354_9": 0, "missing_followup": 0,
                      "medication_requests_without_reason_reference": 0, "deceased_patients": 0,
                      "conditions_with_alternative_code": 0}
        self.rare_indices: set[int] = set()

    # ---- small helpers -------------------------------------------------------------------------
    def uid(self, rng: random.Random | None = None) -> str:
        return _uuid4(f"{(rng or self.rng).getrandbits(128):032x}")

    def write(self, w: Any, res: dict[str, Any]) -> None:
        w.write(orjson.dumps(res))

    def visit(self, pid: str, ts: int, code: str = "185349003",
              display: str = "Encounter for check up (procedure)") -> str | None:
        if self.w_enc is None:
            return None
        eid = self.uid()
        self.write(self.w_enc, fhir.encounter(eid, pid, ts, code=code, display=display))
        return eid

    def day_time(self, ts: float, rng: random.Random | None = None) -> int:
        """Move a timestamp to a plausible clinic time (08:00-17:59) on the same day."""
        day0 = int(ts) - int(ts) % DAY
        return day0 + (rng or self.rng).randrange(8 * 3600, 18 * 3600, 60)

    def pick_start(self, birth: float, min_age: float, max_age_excl: float | None) -> int | None:
        """A treatment start in the history window with age in [min_age, max_age_excl), away from birthdays.

        Keeping 18+ days from a birthday makes the age band unambiguous whether a reader computes age
        in calendar years or as days / 365.25.
        """
        lo = max(birth + min_age * YEAR, self.window[0])
        hi = float(self.window[1])
        if max_age_excl is not None:
            hi = min(hi, birth + max_age_excl * YEAR)
        if hi - lo < 60 * DAY:
            return None
        for _ in range(20):
            t = self.day_time(self.rng.uniform(lo + DAY, hi - DAY))
            frac = ((t - birth) / YEAR) % 1.0
            if 0.05 < frac < 0.95 and lo <= t < hi:
                return t
        return None

    def clip_round(self, measure: cat.Measure, value: float) -> float:
        lo, hi = CLIP[measure.key]
        return round(min(max(value, lo), hi), measure.decimals)

    # ---- observations --------------------------------------------------------------------------
    def outcome_obs(self, pid: str, eid: str | None, measure: cat.Measure, ts: int, value: float,
                    clinical: bool = True) -> None:
        """One outcome measurement. In clinical (planted) measurements the outcome value always has
        its unit; only the diastolic component may lack one, as in Synthea."""
        rng = self.rng
        if measure is cat.SBP:
            panel = cat.BP_PANEL_ALT if rng.random() < 0.2 else cat.SBP.panel
            if panel == cat.BP_PANEL_ALT:
                self.noise["bp_panels_85354_9"] += 1
            dia = round(min(max(0.55 * value + rng.gauss(5.0, 5.0), 45.0), 130.0), 1)
            dia_unit: str | None = "mm[Hg]"
            sys_unit: str | None = "mm[Hg]"
            if rng.random() < 0.02:
                dia_unit = None
                self.noise["diastolic_without_unit"] += 1
            if not clinical and rng.random() < 0.02:
                sys_unit = None
                self.noise["systolic_without_unit"] += 1
            assert panel is not None
            res = fhir.bp_panel(self.uid(), pid, eid, ts, panel=panel, systolic=value, diastolic=dia,
                                systolic_unit=sys_unit, diastolic_unit=dia_unit)
        elif measure is cat.CHOLESTEROL:
            # a panel draws what a total alone draws, in the same order: the LDL's id and value
            # derive from the total's, so the rest of the export does not move (docs/synth.md)
            mmol = not clinical and rng.random() < 0.05
            oid = self.uid()
            ldl = max(value - cat.LDL_BELOW_TOTAL, 20.0)
            if mmol:
                self.noise["cholesterol_mmol_per_l"] += 1
                value, ldl, unit = round(value / 38.67, 2), round(ldl / 38.67, 2), "mmol/L"
            else:
                ldl, unit = round(ldl, 1), None
            self.write(self.w_obs, fhir.lab(oid, pid, eid, measure, ts, value, unit=unit))
            res = fhir.lab(_derived_id(oid), pid, eid, measure, ts, ldl, unit=unit, code=cat.LDL_LOINC)
        else:
            res = fhir.lab(self.uid(), pid, eid, measure, ts, value)
        self.write(self.w_obs, res)

    def vitals(self, pid_b: bytes, ts: int, weight: float, height: float, with_height: bool,
               rng: random.Random | None = None) -> int:
        """A routine vital-signs visit from byte templates; returns the number of lines written."""
        rng = rng or self.rng
        uid = self.uid
        t = fhir.iso(ts).encode()
        m = fhir.iso_ms(ts).encode()
        w = self.w_obs
        tm = self.templates
        hr = cat.HEART_RATE
        w.write(tm.template(hr[0], hr[1], hr[2]) % {b"o": uid(rng).encode(), b"p": pid_b, b"t": t,
                                                     b"m": m, b"v": repr(round(rng.gauss(hr[3], hr[4]), 1)).encode()})
        kg = round(weight + rng.gauss(0.0, 1.2), 1)
        if rng.random() < 0.01:
            self.noise["weight_lb"] += 1
            wt = tm.template(cat.BODY_WEIGHT[0], cat.BODY_WEIGHT[1], "[lb_av]")
            wv = repr(round(kg * 2.20462, 1)).encode()
        else:
            wt = tm.template(cat.BODY_WEIGHT[0], cat.BODY_WEIGHT[1], cat.BODY_WEIGHT[2])
            wv = repr(kg).encode()
        w.write(wt % {b"o": uid(rng).encode(), b"p": pid_b, b"t": t, b"m": m, b"v": wv})
        bmi = round(kg / (height / 100.0) ** 2, 1)
        w.write(tm.template(cat.BMI[0], cat.BMI[1], cat.BMI[2]) % {b"o": uid(rng).encode(), b"p": pid_b,
                                                                    b"t": t, b"m": m, b"v": repr(bmi).encode()})
        n = 3
        if with_height:
            w.write(tm.template(cat.BODY_HEIGHT[0], cat.BODY_HEIGHT[1], cat.BODY_HEIGHT[2])
                    % {b"o": uid(rng).encode(), b"p": pid_b, b"t": t, b"m": m,
                       b"v": repr(round(height, 1)).encode()})
            n += 1
        return n

    # ---- one patient ---------------------------------------------------------------------------
    def run(self, patients: int, observations: int | None, progress: bool, n_rare: int) -> None:
        bar = None
        if progress:
            from rich.console import Console  # lazy: rich only when a bar is wanted
            from rich.progress import Progress

            bar = Progress(console=Console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task("synth: patients", total=patients)
        # The rare cohort is a quota, not a coin flip, so its size per site is predictable:
        # n_rare patients (default round(rare_rate * patients)), at positions chosen by the seeded RNG.
        self.n_rare = n_rare
        self.rare_indices = set(self.rng.sample(range(patients), n_rare)) if n_rare else set()
        try:
            for i in range(patients):
                self.patient(i in self.rare_indices)
                if observations is not None:
                    target = observations * (i + 1) // patients
                    self.pad_observations(target)
                if bar is not None and (i % 50 == 0 or i == patients - 1):
                    bar.update(task, completed=i + 1)
        finally:
            if bar is not None:
                bar.stop()

    def pad_observations(self, target: int) -> None:
        """Add routine vitals visits for the last patient until ``target`` Observation lines exist."""
        p = self.last
        rng = self.pad_rng
        lo = max(p["birth"], REFERENCE_TS - 15 * YEAR)
        hi = p["end"]
        while self.w_obs.lines < target:
            ts = self.day_time(rng.uniform(lo, hi), rng)
            self.vitals(p["pid_b"], ts, p["weight"], p["height"], rng.random() < 0.25, rng)

    def patient(self, rare: bool) -> None:
        rng = self.rng
        prof = self.profile
        pid = self.uid()
        female = rng.random() < prof.female_share
        rare_start = None
        if rare:
            # start first, then an age at start inside the band and away from birthdays
            female = True
            rare_start = self.day_time(rng.uniform(self.window[0] + DAY, self.window[1] - DAY))
            age_at_start = rng.randrange(RARE.age_min, RARE.age_max + 1) + rng.uniform(0.06, 0.94)
            age_now = (REFERENCE_TS - rare_start) / YEAR + age_at_start
        else:
            weights = [w for _, _, w in prof.age_mix]
            lo_age, hi_age, _ = rng.choices(prof.age_mix, weights=weights)[0]
            age_now = rng.uniform(lo_age, hi_age + 1)
        sex = "female" if female else "male"
        birth = REFERENCE_TS - age_now * YEAR
        if rare_start is not None:
            birth = rare_start - age_at_start * YEAR
        birth_ts = int(birth) - int(birth) % DAY
        birth = float(birth_ts)

        given = rng.choice(names.GIVEN_FEMALE if female else names.GIVEN_MALE) + str(rng.randrange(100, 1000))
        family = rng.choice(names.FAMILY) + str(rng.randrange(100, 1000))
        maiden = rng.choice(names.GIVEN_FEMALE) + " " + rng.choice(names.FAMILY)
        city, postal = rng.choice(names.CITIES)
        line = f"{rng.randrange(1, 999)} {rng.choice(names.STREETS)}"
        mrn = self.uid()
        ssn = f"999-{rng.randrange(10, 100)}-{rng.randrange(1000, 10000)}"
        phone = f"555-{rng.randrange(100, 1000)}-{rng.randrange(1000, 10000)}"

        # Which conditions; decided before writing so a deceased date never precedes care.
        episodes: list[tuple[cat.Bucket, int, cat.Treatment | None, bool]] = []
        for bucket in cat.BUCKETS:
            if rare_start is not None and bucket is RARE.bucket:
                episodes.append((bucket, rare_start, RARE.treatment, True))
                continue
            p = bucket.base_prevalence * prof.prevalence.get(bucket.key, 1.0) * _age_factor(age_now)
            if age_now < bucket.min_age_at_onset + 1 or rng.random() >= p:
                continue
            start = self.pick_start(birth, bucket.min_age_at_onset, None)
            if start is None:
                continue
            if rng.random() < bucket.untreated_fraction:
                treatment = None
            elif len(bucket.treatments) > 1 and rng.random() < prof.second_line_share.get(bucket.key, 0.0):
                treatment = bucket.treatments[1]
            else:
                treatment = bucket.treatments[0]
            episodes.append((bucket, start, treatment, False))

        deceased_ts = None
        if not episodes and age_now > 30 and rng.random() < 0.02:
            deceased_ts = self.day_time(REFERENCE_TS - rng.uniform(10, 1000) * DAY)
            self.noise["deceased_patients"] += 1
        self.write(self.w_patient, fhir.patient(
            pid, gender=sex, birth_ts=birth_ts, given=given, family=family, mrn=mrn, ssn=ssn, phone=phone,
            line=line, city=city, postal=postal, maiden=maiden, deceased_ts=deceased_ts))

        if age_now >= 18:
            height = rng.gauss(176.0 if not female else 163.0, 7.0)
            weight = rng.gauss(27.0, 4.0) * (height / 100.0) ** 2
        else:  # children: rough growth curve, BMI around 17
            height = 75.0 + 5.6 * age_now + rng.gauss(0.0, 4.0)
            weight = rng.gauss(17.0, 2.0) * (height / 100.0) ** 2
        end = float(deceased_ts) if deceased_ts is not None else float(REFERENCE_TS - DAY)
        pid_b = pid.encode()
        # what pad_observations needs to add vitals for this patient (nothing else is kept)
        self.last = {"pid_b": pid_b, "birth": birth, "end": end, "weight": weight, "height": height}

        buckets_held = set()
        for bucket, start, treatment, is_rare in episodes:
            buckets_held.add(bucket.key)
            self.episode(pid, birth, sex, bucket, start, treatment, is_rare)

        # A realistic handful of routine visits: vitals, and screening values of the outcome measures
        # for patients who do not have that condition (they never enter a planted cohort).
        adult = age_now >= 18
        n_visits = rng.randint(2, 6) if adult else rng.randint(1, 3)
        lo = max(birth + (18 * YEAR if adult else 0.0), REFERENCE_TS - 12 * YEAR)
        for _ in range(n_visits):
            if lo >= end:
                break
            ts = self.day_time(rng.uniform(lo, end))
            eid = self.visit(pid, ts)
            self.vitals(pid_b, ts, weight, height, rng.random() < 0.3)
            if not adult:
                continue
            if cat.HYPERTENSION.key not in buckets_held:
                self.outcome_obs(pid, eid, cat.SBP, ts, round(rng.gauss(cat.SBP.healthy_mean, cat.SBP.healthy_sd), 1),
                                 clinical=False)
            if cat.HYPERLIPIDEMIA.key not in buckets_held and rng.random() < 0.4:
                m = cat.CHOLESTEROL
                self.outcome_obs(pid, eid, m, ts, round(rng.gauss(m.healthy_mean, m.healthy_sd), 1), clinical=False)
            if cat.DIABETES_T2.key not in buckets_held and rng.random() < 0.25:
                m = cat.HBA1C
                self.outcome_obs(pid, eid, m, ts, round(rng.gauss(m.healthy_mean, m.healthy_sd), 1), clinical=False)

    def episode(self, pid: str, birth: float, sex: str, bucket: cat.Bucket, start: int,
                treatment: cat.Treatment | None, is_rare: bool) -> None:
        rng = self.rng
        measure = bucket.measure
        if treatment is None:
            onset = start  # the index date of an untreated patient is the diagnosis
        else:
            onset = self.day_time(max(start - rng.uniform(0.0, 400.0) * DAY, birth + (17 * YEAR)))
            onset = min(onset, start - 3600)
        cid = self.uid()
        eid = self.visit(pid, onset)
        code = None
        if bucket.alt_code is not None and rng.random() < bucket.alt_code[2]:
            code = bucket.alt_code[:2]
            self.noise["conditions_with_alternative_code"] += 1
        self.write(self.w_condition, fhir.condition(cid, pid, eid, bucket, onset, code))

        if treatment is None:
            # Diagnosed, never treated: two measurements about a year apart drift a little.
            band = cat.age_band((onset - birth) / YEAR)
            mean, sd = planted_effect(bucket, None, band, sex)
            first = self.clip_round(measure, rng.gauss(measure.diagnosed_mean, measure.diagnosed_sd))
            self.outcome_obs(pid, eid, measure, onset, first)
            second_ts = self.day_time(onset + rng.uniform(300.0, 420.0) * DAY)
            change = None
            if second_ts < REFERENCE_TS:
                second = self.clip_round(measure, first + rng.gauss(mean, sd))
                self.outcome_obs(pid, self.visit(pid, second_ts), measure, second_ts, second)
                change = round(second - first, 6)
            self._acc((bucket.key, "untreated", band, sex)).add(change, measure.response_threshold)
            return

        band = cat.age_band((start - birth) / YEAR)
        # only the rare quota may land in the rare cohort, and it always must
        assert is_rare == ((bucket.key, treatment.key, band, sex) == rare_key()), "rare cohort leak"
        mean, sd = planted_effect(bucket, treatment, band, sex)
        if onset < start - DIAGNOSIS_VALUE_MIN_DAYS * DAY:  # outside the baseline window
            self.outcome_obs(pid, eid, measure, onset,
                             self.clip_round(measure, rng.gauss(measure.diagnosed_mean, measure.diagnosed_sd)))
        base_ts = self.day_time(start - rng.uniform(*BASELINE_DAYS) * DAY)
        if base_ts >= start:
            base_ts -= DAY
        baseline = self.clip_round(measure, rng.gauss(measure.diagnosed_mean, measure.diagnosed_sd))
        self.outcome_obs(pid, self.visit(pid, base_ts), measure, base_ts, baseline)

        with_reason = rng.random() < REASON_REFERENCE_RATE
        t = start
        requests: list[int] = []
        while t < min(start + REFILL_SPAN_DAYS * DAY, REFERENCE_TS) and len(requests) < 10:
            requests.append(t)
            t = self.day_time(t + rng.uniform(*REFILL_DAYS) * DAY)
        for k, ts in enumerate(requests):
            status = "active" if k == len(requests) - 1 else "stopped"
            self.write(self.w_medreq, fhir.medication_request(
                self.uid(), pid, self.visit(pid, ts, "390906007", "Follow-up encounter"), treatment, ts,
                status=status, reason_condition_id=cid if with_reason else None))
            if not with_reason:
                self.noise["medication_requests_without_reason_reference"] += 1

        followup = self.clip_round(measure, baseline + rng.gauss(mean, sd))
        change: float | None = None
        if rng.random() < MISSING_FOLLOWUP_RATE:
            self.noise["missing_followup"] += 1
        else:
            fu_ts = self.day_time(start + rng.uniform(*FOLLOWUP_DAYS) * DAY)
            self.outcome_obs(pid, self.visit(pid, fu_ts), measure, fu_ts, followup)
            change = round(followup - baseline, 6)
        late_ts = self.day_time(start + rng.uniform(*LATE_DAYS) * DAY)
        if late_ts < REFERENCE_TS:
            late = self.clip_round(measure, followup + rng.gauss(0.0, sd * 0.3))
            self.outcome_obs(pid, self.visit(pid, late_ts), measure, late_ts, late)
        self._acc((bucket.key, treatment.key, band, sex)).add(change, measure.response_threshold)

    def _acc(self, key: tuple[str, str, str, str]) -> _Acc:
        a = self.acc.get(key)
        if a is None:
            a = self.acc[key] = _Acc()
        return a

    # ---- answer key ----------------------------------------------------------------------------
    def truth(self, *, patients: int, observations_target: int | None, counts: dict[str, int],
              files: list[str], max_lines: int, gzip: bool) -> dict[str, Any]:
        cohorts = []
        bands = {label: (lo, hi) for label, lo, hi in cat.AGE_BANDS}
        for bucket in cat.BUCKETS:
            m = bucket.measure
            options: list[cat.Treatment | None] = [*bucket.treatments, None]
            for treatment in options:
                for band in COHORT_BANDS:
                    for sex in SEXES:
                        mean, sd = planted_effect(bucket, treatment, band, sex)
                        tkey = treatment.key if treatment else "untreated"
                        lo, hi = bands[band]
                        cohorts.append({
                            "bucket": bucket.key,
                            "condition": _condition_codes(bucket),
                            "treatment": None if treatment is None else _treatment_dict(treatment),
                            "measure": m.key,
                            "loinc": m.loinc,
                            "unit": m.unit,
                            "age_band": {"label": band, "min": lo, "max": hi},
                            "sex": sex,
                            "rare": (bucket.key, tkey, band, sex) == rare_key(),
                            "planted": {
                                "mean_change": round(mean, 6),
                                "sd_change": round(sd, 6),
                                "response_threshold": m.response_threshold,
                                "expected_responder_fraction": round(
                                    expected_responder_fraction(mean, sd, m.response_threshold), 6),
                            },
                            "generated": self.acc.get((bucket.key, tkey, band, sex), _Acc()).as_dict(),
                        })
        rare_gen = self.acc.get(rare_key(), _Acc()).as_dict()
        return {
            "schema": TRUTH_SCHEMA,
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "site_profile": self.profile.name,
            "site_profile_description": self.profile.description,
            "patients": patients,
            "observations_target": observations_target,
            "reference_date": fhir.iso(REFERENCE_TS),
            "treatment_starts": {"from": fhir.date_only(self.window[0]),
                                 "to": fhir.date_only(self.window[1] - DAY), "years": self.start_years},
            "export": {"files": files, "counts": counts, "max_lines_per_file": max_lines, "gzip": gzip},
            "timeline_days": {
                "baseline_before_start": list(BASELINE_DAYS),
                "followup_after_start": list(FOLLOWUP_DAYS),
                "late_check_after_start": list(LATE_DAYS),
                "refill_every": list(REFILL_DAYS),
                "missing_followup_rate": MISSING_FOLLOWUP_RATE,
                "reason_reference_rate": REASON_REFERENCE_RATE,
            },
            "measures": {
                b.measure.key: {
                    "loinc": b.measure.loinc,
                    "panels": [cat.SBP.panel[0], cat.BP_PANEL_ALT[0]] if b.measure is cat.SBP else [],
                    "unit": b.measure.unit,
                    "direction": b.measure.direction,
                    "response_threshold": b.measure.response_threshold,
                    "bucket": b.key,
                }
                for b in cat.BUCKETS
            },
            "effects": {k: {"mean": e.mean, "sd": e.sd, "age_shift": e.age_shift, "sex_shift": e.sex_shift}
                        for k, e in EFFECTS.items()},
            "untreated_drift": {k: {"mean": e.mean, "sd": e.sd} for k, e in UNTREATED_DRIFT.items()},
            "rare_cohort": {
                "bucket": RARE.bucket.key,
                "condition": _condition_codes(RARE.bucket),
                "treatment": _treatment_dict(RARE.treatment),
                "age_band": {"label": RARE.age_band, "min": RARE.age_min, "max": RARE.age_max},
                "sex": RARE.sex,
                "planted": {"mean_change": RARE.effect.mean, "sd_change": RARE.effect.sd},
                "usual_effect": dict(zip(("mean_change", "sd_change"),
                                         EFFECTS[RARE.treatment.key].for_cohort(RARE.age_band, RARE.sex),
                                         strict=True)),
                "rate_per_patient": self.profile.rare_rate,
                "expected_patients": self.n_rare,
                "generated": rare_gen,
                "note": "hydrochlorothiazide does not lower systolic BP in this cohort; no other "
                        "hypertensive patient is under 40 at treatment start",
            },
            "noise": dict(self.noise),
            "cohorts": cohorts,
        }


def _condition_codes(bucket: cat.Bucket) -> dict[str, Any]:
    codes = [bucket.snomed] + ([bucket.alt_code[0]] if bucket.alt_code else [])
    return {"system": SNOMED, "code": bucket.snomed, "codes": codes, "display": bucket.display}


def _treatment_dict(t: cat.Treatment) -> dict[str, Any]:
    return {"key": t.key, "system": RXNORM, "rxnorm": t.rxnorm, "name": t.display,
            "tx_code_v1": t.tx_code}


def _age_factor(age: float) -> float:
    if age < 25:
        return 0.0
    if age < 40:
        return 0.2
    if age < 65:
        return 0.55
    return 1.0
