"""The evidence report: one self-contained HTML file a clinician opens from disk and reads offline.

``write_report(evidence_dir)`` reads the three tables the evidence stage writes
(``pooled_outcomes.parquet``, ``site_estimates.parquet``, ``provenance.json``) and nothing else, so
``qis-fhir report DIR`` rebuilds the page from them alone. Every figure on the page is formatted here,
in one place, from the tables' numbers; the page's script only places those strings and draws the
forest plots from the numbers beside them. The data travel inside the file as JSON with every ``<``,
``>`` and ``&`` escaped, the script is allowed by its hash in the page's Content-Security-Policy and
builds elements with ``textContent`` only, so a display name can never become markup or script; the
policy also forbids every request, so the page works the same with no network at all.

Words are chosen for a clinician who knows nothing about how the network works: the page says
"hospital" and "summary", never the protocol's own words (docs/reading-the-evidence.md explains it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from qis_fhir.errors import EvidenceInvalidError, InputNotFoundError
from qis_fhir.evidence.flags import FLAG_TEXT
from qis_fhir.evidence.pooling import CELL_KEYS
from qis_fhir.files import atomic_write
from qis_fhir.mapping.model import UNKNOWN

REPORT_NAME = "report.html"
POOLED_NAME = "pooled_outcomes.parquet"
SITES_NAME = "site_estimates.parquet"
PROVENANCE_NAME = "provenance.json"

COHORT_KEYS = ["condition", "age_band", "sex"]
# one result group: a cohort, one measure, one period under one mapping version; treatments are ranked in it
GROUP_KEYS = [*COHORT_KEYS, "measure", "period", "mapping_version"]

POOLED_COLUMNS = [
    *CELL_KEYS, "sites", "patients", "responders", "rank", "rank_basis", "flags", "age_band_order",
    "condition_display", "treatment_display", "measure_display", "design",
    "resp_pooled", "resp_pooled_lo", "resp_pooled_hi", "resp_re", "resp_re_lo", "resp_re_hi", "resp_pi_lo", "resp_pi_hi",
    "mean_pooled", "mean_pooled_lo", "mean_pooled_hi", "mean_re", "mean_re_lo", "mean_re_hi", "mean_pi_lo", "mean_pi_hi",
    "sd_pooled", "mean_re_sites", "resp_i2", "mean_i2", "local_patients", "local_responders", "local_mean",
]  # fmt: skip
SITE_ESTIMATE_COLUMNS = [*CELL_KEYS, "site", "patients", "mean", "resp", "resp_lo", "resp_hi", "mean_lo", "mean_hi", "resp_weight", "mean_weight"]
PROVENANCE_KEYS = ["run_date", "local_site", "sites", "packets_used", "packets_rejected", "mapping_version", "manifest_version", "cells", "min_cell_size"]

#: near-match cohorts are shown when the chosen cohort has fewer pooled patients than this
NEAR_MATCH_BELOW = 30
#: interval level the tables are computed at (``pool_cells(level=0.95)``); provenance may say otherwise
DEFAULT_LEVEL = 0.95
#: the other sex a near match looks at; any other value (other, unknown) looks at both
_OTHER_SEX = {"female": ("male",), "male": ("female",)}
_SEX_LABEL = {"female": "Female", "male": "Male", "other": "Other", UNKNOWN: "Not recorded"}
#: how a withheld summary is explained, by the verifier's reason (qis_fhir.packets.verifier.REJECTED)
WITHHELD_TEXT = {
    "oversize": "larger than any genuine summary can be",
    "malformed": "could not be read",
    "governance_key": "signed with the network's administrative key instead of a hospital's own",
    "unknown_key": "signed by a hospital the network does not recognise",
    "revoked_key": "signed with a key the network has withdrawn",
    "bad_signature": "its signature did not check out (altered or damaged on the way)",
    "mapping_version": "coded with a version of the shared definitions the network does not accept",
    "wrong_design": "its form does not match how the shared definitions measure this outcome",
    "out_of_range": "impossible figures, or fewer patients than the network's minimum group size",
    "replay": "older than a summary already received from the same hospital",
    "equivocation": "contradicted another summary the same hospital sent for the same date",
}
_WITHHELD_OTHER = "withheld for another reason"
#: the page's words for a measure's share and mean, by measure kind (``pooled_outcomes``' ``measure_kind``;
#: a table without that column holds change cells only)
MEASURE_WORDS = {
    "change": {"response": "Responded", "response_lc": "responded", "was": "responded", "mean_name": "Mean change",
               "mean_zero": True, "mean_low": "reading fell", "mean_high": "reading rose",
               "ranked": "ranked by how many responded", "two_treatments": "a patient who started two treatments counts under both"},
    "control": {"response": "Controlled", "response_lc": "controlled", "was": "was controlled", "mean_name": "Mean reading",
                "mean_zero": False, "mean_low": "lower reading", "mean_high": "higher reading",
                "ranked": "ranked by how many were controlled", "two_treatments": "a patient on two treatments counts under both"},
    "poor_control": {"response": "Poorly controlled", "response_lc": "poorly controlled", "was": "was poorly controlled",
                     "mean_name": "Mean reading", "mean_zero": False, "mean_low": "lower reading", "mean_high": "higher reading",
                     "ranked": "ranked by how few were poorly controlled",
                     "two_treatments": "a patient on two treatments counts under both"},
}  # fmt: skip
_UNIT_LABEL = {"mm[Hg]": "mmHg", "%": "percentage points"}
_PLACEHOLDER = re.compile(r"@@(CSP|CSS|JS|DATA)@@")


def write_report(evidence_dir: str | Path) -> Path:
    """Build ``report.html`` in ``evidence_dir`` from the evidence tables there; returns its path.

    Raises ``InputNotFoundError`` when a table is missing and ``EvidenceInvalidError`` when one lacks
    the columns or keys the report reads or carries a flag it cannot explain (both name the file,
    never its content). 1,332 result rows from 3,888 hospital rows: 1.2 s, a 3.2 MB page."""
    evidence_dir = Path(evidence_dir)
    pooled, per_site, provenance = read_tables(evidence_dir)
    data = report_data(pooled, per_site, provenance, FLAG_TEXT)
    path = evidence_dir / REPORT_NAME
    atomic_write(path, render_html(data).encode("utf-8"))
    return path


def read_tables(evidence_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The three inputs, checked for what the report reads."""
    paths = [evidence_dir / name for name in (POOLED_NAME, SITES_NAME, PROVENANCE_NAME)]
    for path in paths:
        if not path.is_file():
            raise InputNotFoundError(f"{path.name} not found in {evidence_dir}: run `qis-fhir evidence` first")
    pooled = pd.read_parquet(paths[0])
    per_site = pd.read_parquet(paths[1])
    try:
        provenance = json.loads(paths[2].read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvidenceInvalidError(f"{PROVENANCE_NAME} is not valid JSON ({type(exc).__name__})") from None
    for name, have, need in (
        (POOLED_NAME, pooled.columns, POOLED_COLUMNS),
        (SITES_NAME, per_site.columns, SITE_ESTIMATE_COLUMNS),
        (PROVENANCE_NAME, provenance if isinstance(provenance, dict) else {}, PROVENANCE_KEYS),
    ):
        missing = [c for c in need if c not in have]
        if missing:
            raise EvidenceInvalidError(f"{name} lacks {', '.join(missing)}: rebuild it with `qis-fhir evidence`")
    return pooled, per_site, provenance


# ---------------------------------------------------------------------------------------------------
# formatting: the one place a number becomes text on the page


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA


def fmt_count(x: Any) -> str:
    return "" if _missing(x) else f"{int(x):,}"


def fmt_pct(p: Any) -> str:
    """A proportion 0..1 as a percentage with one decimal: 0.4523 -> "45.2%"."""
    return "" if _missing(p) else f"{float(p) * 100:.1f}%"


def fmt_num(x: Any, decimals: int) -> str:
    """A signed figure with a true minus sign: -12.34 -> "−12.3"; "" when not computed."""
    if _missing(x):
        return ""
    text = f"{float(x):.{decimals}f}"
    if float(text) == 0:  # "-0.0" reads as a direction; it is no change at this precision
        text = text.lstrip("-")
    return text.replace("-", "\u2212")


def fmt_i2(i2: Any) -> str:
    """I^2, a fraction 0..1 in the tables, as the whole percentage meta-analyses print: 0.624 -> "62%"."""
    return "" if _missing(i2) else f"{float(i2) * 100:.0f}%"


def fmt_range(lo: Any, hi: Any, fmt) -> str:
    """"40.1% to 50.3%"; "" when either end is not computed (too few hospitals)."""
    return "" if _missing(lo) or _missing(hi) else f"{fmt(lo)} to {fmt(hi)}"


def fmt_date(value: Any) -> str:
    """YYYYMMDD (int) or YYYY-MM-DD (str) as "1 Dec 2024"."""
    digits = str(value).replace("-", "")
    try:
        d = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise EvidenceInvalidError(f"{PROVENANCE_NAME}: a date is not YYYYMMDD or YYYY-MM-DD") from None
    return f"{d.day} {d.strftime('%b %Y')}"


def mean_decimals(sd: pd.Series) -> int:
    """Decimals for a measure's changes: two significant digits of a typical patient's spread, 1..3.

    Systolic pressure (SD ~ 12 mmHg) gets 1 decimal, HbA1c (SD ~ 0.8 points) gets 2: one rule keeps
    both readable without hiding a real HbA1c difference behind rounding."""
    sd = sd[(sd > 0) & sd.notna()]
    if sd.empty:
        return 1
    return max(1, min(3, 1 - math.floor(math.log10(float(sd.median())))))


def age_label(band: str) -> str:
    if band == UNKNOWN:
        return "Age not recorded"
    if band.endswith("+"):
        return f"{band[:-1]} years and over"
    return band.replace("-", "\u2013") + " years"


def sex_label(sex: str) -> str:
    return _SEX_LABEL.get(sex, sex.capitalize())


def unit_label(unit: Any) -> str:
    return "" if _missing(unit) or not unit else _UNIT_LABEL.get(str(unit), str(unit))


# ---------------------------------------------------------------------------------------------------
# the page's data


def report_data(pooled: pd.DataFrame, per_site: pd.DataFrame, provenance: dict, flag_text: dict[str, str]) -> dict:
    """Everything the page shows, as JSON-ready text (and the numbers the plots are drawn from)."""
    pooled = pooled.sort_values(["age_band_order", *GROUP_KEYS, "rank"], kind="stable").reset_index(drop=True)
    level = float(provenance.get("level", DEFAULT_LEVEL))
    local_site = str(provenance["local_site"])
    unknown = sorted({code for flags in pooled["flags"] for code in _codes(flags)} - set(flag_text))
    if unknown:
        raise EvidenceInvalidError(f"{POOLED_NAME} carries flags the report cannot explain: {', '.join(unknown)}")

    bands = [str(b) for b in dict.fromkeys(pooled["age_band"])]  # in the mapping's order (sorted by age_band_order above)
    known_sexes = list(_SEX_LABEL)
    sexes = sorted({str(s) for s in pooled["sex"]}, key=lambda s: (known_sexes.index(s) if s in known_sexes else len(known_sexes), s))
    conditions = pooled.drop_duplicates("condition").sort_values("condition_display")
    measures = {}
    for mid, rows in pooled.groupby("measure", sort=True):
        first = rows.iloc[0]
        kind = _optional(first, "measure_kind") or "change"
        measures[str(mid)] = {
            "label": _name(first["measure_display"], mid),
            "design": str(first["design"]),
            "unit": unit_label(first.get("measure_unit")),
            "direction": _optional(first, "measure_direction"),
            # which way the share counted in "responders" is better: lower for a poor-control measure
            "response_direction": _optional(first, "response_direction") or "higher",
            "words": MEASURE_WORDS.get(kind, MEASURE_WORDS["change"]),
            "decimals": mean_decimals(rows["sd_pooled"]),
        }

    # plain records: building the page row by row through pandas cost 10x more (itertuples per group)
    sites_by_cell: dict[tuple, list[dict]] = {}
    for s in per_site.sort_values("site", kind="stable").to_dict("records"):
        sites_by_cell.setdefault(tuple(s[k] for k in CELL_KEYS), []).append(s)
    rows_by_group: dict[tuple, list[dict]] = {}
    for r in pooled.to_dict("records"):
        rows_by_group.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    groups, index = [], {}
    for key, rows in rows_by_group.items():
        index[key] = len(groups)
        groups.append(_group(key, rows, sites_by_cell, measures[key[3]], flag_text, local_site))

    several_versions = pooled["mapping_version"].nunique() > 1
    choices, cohorts = {}, []
    for cond, rows in pooled.groupby("condition", sort=False):
        periods = rows.drop_duplicates(["period", "mapping_version"]).sort_values(["period", "mapping_version"], ascending=False)
        choices[str(cond)] = {
            "measures": [{"id": m, "label": measures[m]["label"]} for m in sorted({str(m) for m in rows["measure"]})],
            "periods": [
                {"id": _period_id(p, v), "label": f"{p} (definitions {v})" if several_versions else str(p)}
                for p, v in zip(periods["period"], periods["mapping_version"])
            ],
        }
        for measure, period, version in rows[["measure", "period", "mapping_version"]].drop_duplicates().itertuples(index=False):
            for band in bands:
                for sex in sexes:
                    key = (cond, band, sex, measure, period, version)
                    gi = index.get(key)
                    patients = groups[gi]["patients_n"] if gi is not None else 0
                    near = _near(key, bands, index, groups) if patients < NEAR_MATCH_BELOW else []
                    cohorts.append({"condition": cond, "age_band": band, "sex": sex, "measure": measure,
                                    "period": _period_id(period, version), "group": gi, "near": near})  # fmt: skip

    return {
        "level": f"{level * 100:g}%",
        "near_below": NEAR_MATCH_BELOW,
        "observational": flag_text["observational"],
        "local_site": local_site,
        "conditions": [{"id": str(c), "label": _name(d, c)} for c, d in zip(conditions["condition"], conditions["condition_display"])],
        "age_bands": [{"id": b, "label": age_label(b)} for b in bands],
        "sexes": [{"id": s, "label": sex_label(s)} for s in sexes],
        "measures": measures,
        "choices": choices,
        "groups": groups,
        "cohorts": cohorts,
        "glossary": GLOSSARY,
        "provenance": _provenance(provenance),
    }


def _optional(row: pd.Series, column: str) -> str:
    """A text column tables from before it existed lack: "" when absent or missing."""
    return str(row[column]) if column in row.index and not _missing(row[column]) else ""


def _name(display: Any, code: Any) -> str:
    """A display name, or the shared code when this site's definitions have no name for it."""
    return f"{code} (no local name)" if _missing(display) or not str(display).strip() else str(display)


def _codes(flags: Any) -> list[str]:
    return [] if _missing(flags) else [c for c in str(flags).split(";") if c]


def _period_id(period: Any, version: Any) -> str:
    return f"{period}|{version}"


def _cohort_label(band: str, sex: str) -> str:
    return f"{sex_label(sex)} \u00b7 {age_label(band)}"


def _group(key: tuple, rows: list[dict], sites_by_cell: dict, measure: dict, flag_text: dict, local_site: str) -> dict:
    cond, band, sex, *_ = key
    decimals = measure["decimals"]
    unit = f" {measure['unit']}" if measure["unit"] else ""

    def num(x):
        return fmt_num(x, decimals)

    treatments = []
    for r in rows:
        site_rows = sites_by_cell.get(tuple(r[k] for k in CELL_KEYS), [])
        local_n = r["local_patients"]
        k = 0 if _missing(r["sites"]) else int(r["sites"])
        treatments.append({
            "id": str(r["treatment"]),
            "name": _name(r["treatment_display"], r["treatment"]),
            "rank": "" if _missing(r["rank"]) else str(int(r["rank"])),
            "rank_basis": "" if _missing(r["rank_basis"]) else str(r["rank_basis"]),
            "patients": fmt_count(r["patients"]),
            "sites": fmt_count(r["sites"]),
            "resp_pooled": fmt_pct(r["resp_pooled"]),
            "resp_pooled_ci": fmt_range(r["resp_pooled_lo"], r["resp_pooled_hi"], fmt_pct),
            "resp_re": fmt_pct(r["resp_re"]),
            "resp_re_ci": fmt_range(r["resp_re_lo"], r["resp_re_hi"], fmt_pct),
            "resp_pi": fmt_range(r["resp_pi_lo"], r["resp_pi_hi"], fmt_pct),
            "mean_pooled": num(r["mean_pooled"]),
            "mean_pooled_ci": fmt_range(r["mean_pooled_lo"], r["mean_pooled_hi"], num),
            "mean_re": num(r["mean_re"]),
            "mean_re_ci": fmt_range(r["mean_re_lo"], r["mean_re_hi"], num),
            "mean_pi": fmt_range(r["mean_pi_lo"], r["mean_pi_hi"], num),
            "resp_i2": fmt_i2(r["resp_i2"]),
            "mean_i2": fmt_i2(r["mean_i2"]),
            **_notes(r, k),
            "unit": unit.strip(),
            "local": None if _missing(local_n) or int(local_n) == 0 else {
                "patients": fmt_count(local_n),
                "resp": fmt_pct(r["local_responders"] / local_n) if not _missing(r["local_responders"]) else "",
                "mean": num(r["local_mean"]),
            },
            "flags": [{"code": c, "text": flag_text[c]} for c in _codes(r["flags"]) if c != "observational"],
            "plot": _plot(r, site_rows, local_site, num, unit, measure["words"]),
        })  # fmt: skip
    patients = sum(int(r["patients"]) for r in rows)
    return {
        "condition_id": str(cond),
        "measure": str(key[3]),
        "period": _period_id(key[4], key[5]),
        "cohort": _cohort_label(band, sex),
        "age_band": band,
        "sex": sex,
        "patients_n": patients,
        "patients": fmt_count(patients),
        "treatments": treatments,
    }


def _notes(r: dict, k: int) -> dict[str, str]:
    """Why a between-hospital figure is blank, in words: too few hospitals, or a result no model can spread."""
    def needs(sites: int, fit_sites: int) -> str:
        if k < sites:
            return f"needs {sites} or more hospitals"
        if fit_sites < sites:
            return f"needs {sites} or more hospitals whose patients' changes vary"
        return "could not be estimated"

    if int(r["responders"]) == int(r["patients"]):
        uniform = "not estimated: every patient responded"
    elif int(r["responders"]) == 0:
        uniform = "not estimated: no patient responded"
    else:
        uniform = "could not be estimated"
    # the mean change's model leaves out hospitals whose patients' changes are all identical (or one patient)
    mean_sites = 0 if _missing(r["mean_re_sites"]) else int(r["mean_re_sites"])
    return {
        "resp_re_note": needs(2, k),
        "resp_pi_note": needs(3, k) if k < 3 else uniform,
        "mean_re_note": needs(2, mean_sites),
        "mean_pi_note": needs(3, mean_sites),
    }


def _plot(r: dict, site_rows: list[dict], local_site: str, num, unit: str, words: dict) -> dict:
    """The numbers a forest plot is drawn from (None where not computed), and each hospital's figures as text."""

    def val(x):
        return None if _missing(x) else float(x)

    def site_text(s: dict) -> str:
        resp_ci = fmt_range(s["resp_lo"], s["resp_hi"], fmt_pct)
        mean_ci = fmt_range(s["mean_lo"], s["mean_hi"], num)
        mean = "" if _missing(s["mean"]) else f"; {words['mean_name'].lower()} {num(s['mean'])}{unit}" + (f" ({mean_ci})" if mean_ci else "")
        return (f"{s['site']}: {fmt_count(s['patients'])} patients; {fmt_pct(s['resp'])} {words['response_lc']}"
                + (f" ({resp_ci})" if resp_ci else "") + mean)  # fmt: skip

    sites = [
        {
            "site": str(s["site"]), "local": str(s["site"]) == local_site, "patients": int(s["patients"]), "text": site_text(s),
            "resp": val(s["resp"]), "resp_lo": val(s["resp_lo"]), "resp_hi": val(s["resp_hi"]), "resp_w": val(s["resp_weight"]),
            "mean": val(s["mean"]), "mean_lo": val(s["mean_lo"]), "mean_hi": val(s["mean_hi"]), "mean_w": val(s["mean_weight"]),
        }
        for s in site_rows
    ]  # fmt: skip
    fields = ["resp_pooled", "resp_pooled_lo", "resp_pooled_hi", "resp_re", "resp_re_lo", "resp_re_hi", "resp_pi_lo", "resp_pi_hi",
              "mean_pooled", "mean_pooled_lo", "mean_pooled_hi", "mean_re", "mean_re_lo", "mean_re_hi", "mean_pi_lo", "mean_pi_hi"]  # fmt: skip
    return {"sites": sites, **{f: val(r[f]) for f in fields}}


def _near(key: tuple, bands: list[str], index: dict, groups: list[dict]) -> list[dict]:
    """Nearby cohorts with results: the age bands either side (same sex), then the other sex (same band)."""
    cond, band, sex, *rest = key
    out = []
    if band != UNKNOWN:
        known = [b for b in bands if b != UNKNOWN]
        i = known.index(band)
        for j, relation in ((i - 1, "the next younger age group"), (i + 1, "the next older age group")):
            if 0 <= j < len(known):
                out.append(((cond, known[j], sex, *rest), relation))
    for other in _OTHER_SEX.get(sex, ("female", "male")):
        if other != sex:
            out.append(((cond, band, other, *rest), "the same age group, other sex"))
    return [{"group": index[k], "relation": relation} for k, relation in out if k in index]


def _provenance(p: dict) -> dict:
    rejected = p["packets_rejected"] or {}
    reasons: dict[str, int] = {}
    for reason, count in rejected.items():
        text = WITHHELD_TEXT.get(reason, _WITHHELD_OTHER)
        reasons[text] = reasons.get(text, 0) + int(count)
    return {
        "run_date": fmt_date(p["run_date"]),
        "local_site": str(p["local_site"]),
        "sites": [
            {"site": str(s["site"]), "as_of": fmt_date(s["as_of"]), "records": fmt_count(s.get("packets", 0))}
            for s in sorted(p["sites"], key=lambda s: str(s["site"]))
        ],
        "used": fmt_count(p["packets_used"]),
        "withheld": fmt_count(sum(int(c) for c in rejected.values())),
        "withheld_reasons": [{"text": t, "count": fmt_count(c)} for t, c in sorted(reasons.items(), key=lambda kv: -kv[1])],
        "mapping_version": str(p["mapping_version"]),
        "manifest_version": str(p["manifest_version"]),
        "cells": fmt_count(p["cells"]),
        "min_cell_size": fmt_count(p["min_cell_size"]),
    }


GLOSSARY = [
    ("Responded", "The patient's reading improved by at least the amount the participating hospitals agreed "
                  "counts as a clinically meaningful response."),
    ("All patients as if from one hospital", "Every patient counted together, as though all were treated in "
                                             "one place. Precise, but it ignores real differences between hospitals."),
    ("Between hospitals", "Each hospital's result weighed as its own estimate, allowing hospitals to differ. "
                          "Its interval is wider and more honest when hospitals disagree."),
    ("Pooled proportion", "The share of all the group's patients who responded, counted as if from one hospital: "
                          "what ranks a treatment that fewer than three hospitals reported."),
    ("Interval", "The range of values compatible with the data at the stated level. Narrow means precise, "
                 "not necessarily correct."),
    ("Expected range at another hospital", "Where a further, similar hospital's result would be expected to "
                                           "fall. Needs at least three hospitals."),
    ("How much hospitals differ (I\u00b2)", "The part of the differences between hospitals' results that is more "
                                          "than chance would give, from 0% (they agree as well as chance allows) "
                                          "to 100%. Above 50% the treatment carries a caution."),
    ("Mean change", "The average difference between the reading after starting the treatment and the reading "
                    "before it."),
    ("Rank", "The order of the treatments in this group by how many patients responded. A rank is not proof "
             "that one treatment is better."),
    ("Forest plot", "One line per hospital: the square is its result (bigger square, more weight), the line its "
                    "interval. Diamonds show the combined results; the band shows the expected range at another "
                    "hospital."),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# the page


def _asset(name: str) -> str:
    return resources.files("qis_fhir.evidence").joinpath("report_assets", name).read_text(encoding="utf-8")


def embed_json(data: Any) -> str:
    """JSON safe inside a <script> element: no ``<``, ``>`` or ``&`` survives, so no ``</script>``,
    ``<!--`` or entity can end or bend the element whatever a display name holds."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_html(data: dict) -> str:
    """The page: template, CSS, script and data in one file; the CSP allows that one script and no request."""
    js = _asset("report.js")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; img-src data:; base-uri 'none'; form-action 'none'"
    parts = {"CSP": csp, "CSS": _asset("report.css"), "JS": js, "DATA": embed_json(data)}
    # one pass: text put in is never searched for placeholders again
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset("report.html"))
