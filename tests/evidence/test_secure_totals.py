"""Secure totals in the evidence tables: pooled beside the clear packets, counted as hospitals, shown
without any one hospital's figures, flagged, and readable by the report."""

from __future__ import annotations

import pandas as pd
import pytest

from qis_fhir.evidence.collect import cohort_grid, collect_answers
from qis_fhir.evidence.report import write_report
from qis_fhir.evidence.tables import build_tables, secure_label, write_tables

HTN_F = ("hypertension", "40-64", "female")
HTN_M = ("hypertension", "40-64", "male")


def _secure(cohort, *, sites=3, patients=14, responders=2, measured=14, mean=-1.25, sd=4.5):
    return {"condition": cohort[0], "age_band": cohort[1], "sex": cohort[2], "treatment": "TX_0001",
            "measure": "systolic_bp", "period": "2024", "mapping_version": "v1", "sites": sites, "patients": patients,
            "responders": responders, "measured": measured, "mean": mean, "sd": sd, "as_of": 20260205}


@pytest.fixture
def tables(enet):
    answers = {enet.fp(*HTN_F): [enet.wire("site-a", HTN_F, patients=20, responders=8, mean=-6.5, sd=9.25)]}
    collection = collect_answers(answers, enet.context.manifest, cohort_grid(enet.context, enet.mapping), enet.mapping.version)
    secure = pd.DataFrame([_secure(HTN_F), _secure(HTN_M, sites=4, patients=12, measured=7)])
    return build_tables(collection, enet.mapping, secure_totals=secure, run_date="2026-03-01")


def test_a_secure_total_counts_its_hospitals_beside_the_clear_packets(tables):
    p = tables.pooled.set_index("sex")
    assert (p.loc["female", "sites"], p.loc["female", "secure_sites"], p.loc["female", "packets_used"]) == (4, 3, 1)
    assert (p.loc["female", "patients"], p.loc["female", "responders"]) == (34, 10)
    assert p.loc["female", "mean_pooled"] == pytest.approx((20 * -6.5 + 14 * -1.25) / 34)
    assert (p.loc["male", "sites"], p.loc["male", "secure_sites"], p.loc["male", "packets_used"]) == (4, 4, 0)
    assert "secure_total" in p.loc["male", "flags"].split(";") and "one_site" not in p.loc["male", "flags"]
    assert "secure_total" in p.loc["female", "flags"].split(";")
    assert tables.provenance["secure_cells"] == 2


def test_no_hospital_of_a_secure_total_has_its_own_row_and_a_small_mean_is_withheld(tables):
    male = tables.per_site[tables.per_site["sex"] == "male"]
    assert male["site"].tolist() == [secure_label(4)]
    assert male["measured"].tolist() == [0] and male["mean"].isna().all()  # 7 readings < 11: withheld
    assert tables.pooled.set_index("sex").loc["male", "measured"] == 0


def test_the_report_reads_tables_with_secure_totals(tables, tmp_path):
    write_tables(tables, tmp_path / "evidence")
    html = write_report(tmp_path / "evidence").read_text()
    assert secure_label(4) in html and "pooled by secure aggregation" in html


def test_secure_totals_of_another_mapping_version_are_refused(enet):
    collection = collect_answers({}, enet.context.manifest, cohort_grid(enet.context, enet.mapping), enet.mapping.version)
    with pytest.raises(ValueError, match="mapping version"):
        build_tables(collection, enet.mapping, secure_totals=pd.DataFrame([_secure(HTN_F) | {"mapping_version": "v2"}]))
