"""The evidence tables: what the report (and a clinician reading the CSV) gets from one collection."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from report_tables import embedded_data

from qis_fhir.evidence.collect import cohort_grid, collect_answers
from qis_fhir.evidence.pooling import CELL_KEYS
from qis_fhir.evidence.report import write_report
from qis_fhir.evidence.tables import build_tables, write_tables

HTN_F = ("hypertension", "40-64", "female")
HTN_F_YOUNG = ("hypertension", "18-39", "female")


def _collection(enet, *, local="site-b"):
    fp, fp_young = enet.fp(*HTN_F), enet.fp(*HTN_F_YOUNG)
    answers = {
        fp: [
            enet.wire("site-a", HTN_F, patients=20, responders=8, mean=-6.5, sd=9.25, seq=20241201),
            enet.wire("site-c", HTN_F, patients=30, responders=21, mean=-11.0, sd=8.0, seq=20241115),
            enet.wire("site-a", HTN_F, period="2023", patients=14, responders=5, mean=-4.0, sd=7.5, seq=20241201),
            enet.wire("site-c", HTN_F, patients=30, responders=21, mean=-11.0, sd=8.0, seq=20241115)[:-3] + b"xx}",
        ],
        fp_young: [enet.wire("site-c", HTN_F_YOUNG, treatment="TX_0002", patients=12, responders=6, mean=-8.0, sd=5.0)],
    }
    grid = cohort_grid(enet.context, enet.mapping)
    return collect_answers(answers, enet.context.manifest, grid, enet.mapping.version, local_site_id=local)


def _local_events(mapping) -> pd.DataFrame:
    """Site B's own events: 3 patients in the 2024 cell (too few to publish), one of them treated twice."""
    rows = [
        ("p1", "2024-02", -12.0, True, "2024-02-01"),
        ("p1", "2024-09", -30.0, True, "2024-09-01"),  # the same patient again in the same cell: not counted twice
        ("p2", "2024-03", -4.0, False, "2024-03-01"),
        ("p3", "2024-05", 2.0, False, "2024-05-01"),
        ("p4", "2022-05", -15.0, True, "2022-05-01"),  # a cell nobody in the network has
    ]
    return pd.DataFrame({
        "patient_key": [r[0] for r in rows], "bucket": "hypertension", "treatment_code": "TX_0001",
        "measure": "systolic_bp", "start_period": [r[1] for r in rows], "age_band": "40-64", "sex": "female",
        "change": [r[2] for r in rows], "responded": [r[3] for r in rows], "mapping_version": mapping.version,
        "start": pd.to_datetime([r[4] for r in rows], utc=True), "event_id": [f"e{i}" for i in range(len(rows))],
    })


def test_pooled_rows_carry_names_design_counts_and_the_sites_own_figures(enet):
    c = _collection(enet)
    t = build_tables(c, enet.mapping, local_events=_local_events(enet.mapping), run_date="2024-12-02")
    pooled = t.pooled.set_index(["age_band", "treatment", "period"])
    assert list(pooled.index) == [("18-39", "TX_0002", "2024"), ("40-64", "TX_0001", "2023"), ("40-64", "TX_0001", "2024")]
    main = pooled.loc[("40-64", "TX_0001", "2024")]
    assert (main["sites"], main["patients"], main["responders"]) == (2, 50, 29)
    assert (main["as_of_min"], main["as_of_max"]) == (20241115, 20241201)
    assert main["mean_pooled"] == pytest.approx((20 * -6.5 + 30 * -11.0) / 50, abs=1e-9)
    assert main["condition_display"] == "Essential (primary) hypertension"
    assert main["treatment_display"] == "Hydrochlorothiazide oral tablet"
    assert main["measure_display"].startswith("Systolic blood pressure")
    assert "180 days" in main["design"] and "28-400 days" in main["design"] and "fell by at least 10 mmHg" in main["design"]
    # which way is better for the mean change, and its unit, from the mapping's measure definition
    assert (main["measure_unit"], main["measure_direction"]) == ("mm[Hg]", "lower")
    assert (main["packets_used"], main["packets_rejected"]) == (2, 1)  # the broken copy was under this cohort
    assert pooled.loc[("18-39", "TX_0002", "2024"), "packets_rejected"] == 0
    assert (main["local_patients"], main["local_responders"], main["local_mean"]) == (3, 1, round((-12.0 - 4.0 + 2.0) / 3, 4))
    other_year = pooled.loc[("40-64", "TX_0001", "2023")]
    assert other_year["patients"] == 14 and pd.isna(other_year["local_patients"]) and math.isnan(other_year["local_mean"])
    # age bands carry their place in the mapping, which the report orders them by (not the label's text)
    bands = list(enet.mapping.cohorts.band_values)
    assert [bands[i] for i in t.pooled["age_band_order"]] == list(t.pooled["age_band"])
    assert (t.pooled["manifest_version"] == enet.context.manifest.version).all()


def test_provenance_names_sites_only_there_and_counts_what_was_refused(enet):
    t = build_tables(_collection(enet), enet.mapping, run_date="2024-12-02")
    p = t.provenance
    assert p["run_date"] == "2024-12-02"
    assert p["local_site"] == "Hospital B"
    assert p["sites"] == [
        {"site": "Hospital A", "site_id": "site-a", "packets": 2, "as_of": 20241201, "oldest_as_of": 20241201},
        {"site": "Hospital C", "site_id": "site-c", "packets": 2, "as_of": 20241201, "oldest_as_of": 20241115},
    ]
    assert (p["packets_received"], p["packets_used"], p["packets_rejected"], p["cells"]) == (5, 4, {"malformed": 1}, 3)
    assert (p["mapping_version"], p["manifest_version"], p["min_cell_size"]) == ("v1", enet.context.manifest.version, 11)
    assert (p["cohorts_queried"], p["cohorts_answered"]) == (80, 2)
    assert set(t.per_site["site"]) == {"Hospital A", "Hospital C"}


def test_written_files_round_trip_and_hold_no_real_site_id(enet, tmp_path):
    t = build_tables(_collection(enet), enet.mapping, local_events=_local_events(enet.mapping), run_date="2024-12-02")
    paths = write_tables(t, tmp_path / "evidence")
    assert sorted(p.name for p in paths.values()) == [
        "pooled_outcomes.csv", "pooled_outcomes.parquet", "provenance.json", "site_estimates.parquet"]
    pooled = pd.read_parquet(paths["pooled_outcomes"])
    pd.testing.assert_frame_equal(pooled, t.pooled)
    assert json.loads(paths["provenance"].read_text()) == t.provenance
    csv_lines = paths["pooled_outcomes_csv"].read_text().splitlines()
    header = csv_lines[0].split(",")
    assert header[: len(CELL_KEYS)] == CELL_KEYS and "local_patients" in header
    row_2023 = next(line for line in csv_lines[1:] if ",2023," in line)
    assert "nan" not in row_2023.lower() and ",," in row_2023  # NaN is an empty field
    for name in ("pooled_outcomes", "pooled_outcomes_csv", "site_estimates"):
        assert b"site-" not in paths[name].read_bytes(), name


def test_nothing_from_the_network_still_writes_tables_that_say_so(enet, tmp_path):
    grid = cohort_grid(enet.context, enet.mapping)
    c = collect_answers({fp: [] for fp in grid}, enet.context.manifest, grid, enet.mapping.version, local_site_id="site-a")
    t = build_tables(c, enet.mapping, run_date="2024-12-02")
    paths = write_tables(t, tmp_path / "evidence")
    assert len(pd.read_parquet(paths["pooled_outcomes"])) == 0
    prov = json.loads(paths["provenance"].read_text())
    assert (prov["packets_used"], prov["sites"], prov["local_site"], prov["cohorts_answered"]) == (0, [], "Hospital A", 0)
    # the report is still built from them: a page with no results rather than a refusal
    page = embedded_data(write_report(tmp_path / "evidence").read_text(encoding="utf-8"))
    assert (page["groups"], page["provenance"]["used"]) == ([], "0")


def test_each_cell_is_fitted_once(enet, monkeypatch):
    """The between-hospital fit is the stage's cost (6 ms a 50-site cell): the pooled and per-site tables
    come from one fit, not one each."""
    from qis_fhir.evidence import pooling

    fits = []
    real = pooling.binomial_normal_re
    monkeypatch.setattr(pooling, "binomial_normal_re", lambda *a, **kw: fits.append(a) or real(*a, **kw))
    t = build_tables(_collection(enet), enet.mapping)
    p = t.pooled
    mixed = (p["sites"] >= 2) & (p["responders"] > 0) & (p["responders"] < p["patients"])
    assert len(fits) == mixed.sum() == 1
