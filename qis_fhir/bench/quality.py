"""``qis-fhir bench --only quality``: great-expectations validation time on a large observations table.

Measures, in one run and on the same DataFrame: the shipped v1 ``observations`` suite through GE, a five-rule suite through GE,
and the same five rules as plain vectorised pandas (the floor GE's per-expectation overhead sits on).
"""

from __future__ import annotations

import time
from typing import Any


def make_observations(rows: int, seed: int = 7):
    """A valid observations table of ``rows`` rows (systolic, diastolic, cholesterol, HbA1c)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    kinds = np.array(["8480-6", "8462-4", "2093-3", "4548-4"])
    units = {"8480-6": "mm[Hg]", "8462-4": "mm[Hg]", "2093-3": "mg/dL", "4548-4": "%"}
    lo = {"8480-6": 90.0, "8462-4": 50.0, "2093-3": 120.0, "4548-4": 4.0}
    hi = {"8480-6": 200.0, "8462-4": 120.0, "2093-3": 320.0, "4548-4": 12.0}
    code = kinds[rng.integers(0, len(kinds), rows)]
    value = rng.uniform(0, 1, rows)
    lows, highs = np.vectorize(lo.get)(code), np.vectorize(hi.get)(code)
    value = lows + value * (highs - lows)
    keys = np.array([f"{i:032x}" for i in rng.integers(0, 2**62, max(rows // 50, 1))])
    return pd.DataFrame(
        {
            "patient_key": pd.array(keys[rng.integers(0, len(keys), rows)], dtype="str"),
            "code_system": pd.array(["http://loinc.org"] * rows, dtype="str"),
            "code": pd.array(code, dtype="str"),
            "panel_code": pd.array(np.where(np.isin(code, ["8480-6", "8462-4"]), "55284-4", None), dtype="str"),
            "value": value.astype("float64"),
            "unit": pd.array(np.vectorize(units.get)(code), dtype="str"),
            "effective": pd.Timestamp("2015-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 3000, rows), unit="D"),
            "status": pd.array(["final"] * rows, dtype="str"),
            "source_file": pd.array(["Observation.000.ndjson"] * rows, dtype="str"),
            "source_line": np.arange(1, rows + 1, dtype="int64"),
        }
    )


FIVE_RULES = """\
schema: 1
tables:
  observations:
    - not_null: patient_key
    - matches_regex: {column: patient_key, regex: "^[0-9a-f]{32}$"}
    - in_set: {column: unit, values: ["mm[Hg]"], where: {code: "8480-6"}}
    - between: {column: value, min: 40, max: 300, where: {code: "8480-6"}}
    - not_in_future: effective
"""


def _pandas_five(df) -> bool:
    import pandas as pd

    sbp = df["code"] == "8480-6"
    return bool(
        df["patient_key"].notna().all()
        and df["patient_key"].str.fullmatch(r"[0-9a-f]{32}").all()
        and (df.loc[sbp, "unit"] == "mm[Hg]").all()
        and df.loc[sbp, "value"].between(40, 300).all()
        and (df["effective"] <= pd.Timestamp.now(tz="UTC")).all()
    )


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(rows: int = 100_000, seed: int = 7, repeat: int = 3) -> dict[str, Any]:
    from qis_fhir.mapping import load_mapping
    from qis_fhir.quality import check_table, load_suites, parse_suites

    t = time.perf_counter()
    import great_expectations  # noqa: F401

    import_s = time.perf_counter() - t
    mapping = load_mapping()
    df = make_observations(rows, seed)
    full = load_suites(mapping)  # parsed once: the timings below are validation only
    five = parse_suites(FIVE_RULES, mapping)
    first = time.perf_counter()
    assert check_table("observations", df, mapping, suites=full).success  # builds and caches the suite
    first_s = time.perf_counter() - first
    full_s = _best(lambda: check_table("observations", df, mapping, suites=full), repeat)
    five_s = _best(lambda: check_table("observations", df, mapping, suites=five), repeat)
    pandas_s = _best(lambda: _pandas_five(df), repeat)
    n_full = len(full.tables["observations"])
    return {
        "rows": rows,
        "ge_import_s": round(import_s, 3),
        "first_check_s": round(first_s, 3),
        "v1_observations_suite_s": round(full_s, 3),
        "v1_observations_expectations": n_full,
        "five_rules_s": round(five_s, 3),
        "five_rules_pandas_s": round(pandas_s, 4),
        "ge_over_pandas": round(five_s / pandas_s, 1) if pandas_s else None,
        "rows_per_s_v1_suite": int(rows / full_s) if full_s else None,
    }


def run(options: Any) -> dict[str, Any]:
    """``qis-fhir bench`` entry: ``options.observations`` rows (default 100,000)."""
    return measure(options.observations or 100_000, seed=options.seed)


if __name__ == "__main__":  # python -m qis_fhir.bench.quality [ROWS]
    import json
    import sys

    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000), indent=2))
