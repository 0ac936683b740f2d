"""write_report on realistic evidence tables, without a browser: what the file holds and what it refuses."""

from __future__ import annotations

import base64
import hashlib
import re

import pandas as pd
import pytest
from report_tables import EMPTY_COHORT, REAL_SITE_IDS, SMALL_COHORT, embedded_data, write_evidence_tables

from qis_fhir.errors import EvidenceInvalidError, ExitCode, InputNotFoundError
from qis_fhir.evidence import report
from qis_fhir.evidence.flags import FLAG_TEXT
from qis_fhir.packets.verifier import REJECTED

EVIL = "</script><script>alert(1)</script>"
PROTOCOL_WORDS = re.compile(r"\b(dht|packets?|fingerprints?|nodes?|seq|kademlia)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    """One report, read by the tests that only look at it (building it costs ~0.5 s)."""
    out = tmp_path_factory.mktemp("evidence")
    tables = write_evidence_tables(out, treatment_names={"TX_0002": EVIL})
    html = report.write_report(out).read_text(encoding="utf-8")
    return tables, html


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def group_for(data: dict, condition: str, band: str, sex: str, period: str = "2024") -> tuple[dict, dict | None]:
    """The page's entry for a choice of condition, age band, sex and period (as the period select labels it)."""
    period_id = next(p["id"] for p in data["choices"][condition]["periods"] if p["label"] == period)
    cohort = next(c for c in data["cohorts"] if (c["condition"], c["age_band"], c["sex"], c["period"]) == (condition, band, sex, period_id))
    return cohort, (None if cohort["group"] is None else data["groups"][cohort["group"]])


def test_a_display_name_cannot_break_out_of_the_data_element(evidence):
    tables, html = evidence
    assert EVIL not in html and "alert(1)</script>" not in html
    # two script elements, the data and the page's own code: nothing a name holds adds a third
    assert len(re.findall(r"<script\b", html, re.I)) == 2
    names = {t["name"] for g in embedded_data(html)["groups"] for t in g["treatments"]}
    assert EVIL in names  # carried intact, as text, to be shown as text


def test_the_page_is_self_contained(evidence):
    _, html = evidence
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:|//)""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:|//)", html, re.I)
    assert "@import" not in html and "fetch(" not in html and "XMLHttpRequest" not in html
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp
    # the policy allows exactly the page's own script, by its hash
    code = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(code) == 1
    digest = base64.b64encode(hashlib.sha256(code[0].encode("utf-8")).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp


def test_no_protocol_word_and_no_real_site_id_reaches_the_page(evidence):
    _, html = evidence
    data = embedded_data(html)
    shown = list(strings(data))
    template_text = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    assert [s for s in [*shown, template_text] if PROTOCOL_WORDS.search(s)] == []
    for site_id in REAL_SITE_IDS.values():
        assert site_id not in html


def test_figures_are_the_tables_numbers_formatted(evidence):
    tables, html = evidence
    data = embedded_data(html)
    pooled = tables["pooled"]
    for (cond, band, sex, period), rows in pooled.groupby(["condition", "age_band", "sex", "period"]):
        _, group = group_for(data, cond, band, sex, period)
        rows = rows.sort_values("rank")
        assert [t["id"] for t in group["treatments"]] == list(rows["treatment"])
        for t, row in zip(group["treatments"], rows.itertuples()):
            assert t["patients"] == f"{row.patients:,}" and t["sites"] == str(row.sites)
            assert t["resp_pooled"] == f"{row.resp_pooled * 100:.1f}%"
            assert t["resp_pooled_ci"] == f"{row.resp_pooled_lo * 100:.1f}% to {row.resp_pooled_hi * 100:.1f}%"
            if row.sites < 2:
                assert (t["resp_re"], t["resp_re_ci"], t["resp_re_note"]) == ("", "", "needs 2 or more hospitals")
                assert t["resp_i2"] == ""
            else:
                assert t["resp_re"] == f"{row.resp_re * 100:.1f}%"
                assert t["resp_i2"] == f"{row.resp_i2 * 100:.0f}%"  # a fraction in the table, a percentage on the page
            if row.sites < 3:
                assert (t["resp_pi"], t["resp_pi_note"]) == ("", "needs 3 or more hospitals")
            elif row.responders in (0, row.patients):  # no spread between hospitals to predict from: said, not NaN
                said = "every patient responded" if row.responders else "no patient responded"
                assert (t["resp_pi"], t["resp_pi_note"]) == ("", f"not estimated: {said}")
            else:
                assert t["resp_pi"] == f"{row.resp_pi_lo * 100:.1f}% to {row.resp_pi_hi * 100:.1f}%"
            assert t["rank_basis"] == row.rank_basis
            assert (t["local"] is None) == pd.isna(row.local_patients)
    uniform = (pooled["responders"] == 0) | (pooled["responders"] == pooled["patients"])
    assert (uniform & (pooled["sites"] >= 3)).any()  # the tables hold that case: a uniform result from 3+ hospitals


def test_a_mean_change_without_spread_says_which_hospitals_it_needs(tmp_path):
    """Hospitals whose patients all changed alike stay out of the between-hospital mean: the page says
    so instead of showing a blank or 'NaN' where the figure would be."""
    tables = write_evidence_tables(tmp_path)
    pooled = tables["pooled"]
    i = pooled.index[pooled["sites"] >= 3][0]
    pooled.loc[i, ["mean_re_sites", "mean_re", "mean_re_lo", "mean_re_hi", "mean_pi_lo", "mean_pi_hi", "mean_i2"]] = [1] + [None] * 6
    pooled.to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    row = pooled.loc[i]
    data = embedded_data(report.write_report(tmp_path).read_text(encoding="utf-8"))
    _, group = group_for(data, row["condition"], row["age_band"], row["sex"], row["period"])
    t = next(t for t in group["treatments"] if t["id"] == row["treatment"])
    assert (t["mean_re"], t["mean_i2"], t["mean_pi"]) == ("", "", "")
    assert t["mean_re_note"] == "needs 2 or more hospitals whose patients' changes vary"
    assert t["mean_pi_note"] == "needs 3 or more hospitals whose patients' changes vary"
    assert t["resp_re"] != ""  # the share of responders is unaffected


def test_flags_are_shown_in_plain_words_in_the_tables_order(evidence):
    tables, html = evidence
    data = embedded_data(html)
    assert data["observational"] == FLAG_TEXT["observational"]
    row = tables["pooled"].loc[tables["pooled"]["flags"].str.count(";") >= 2].iloc[0]
    _, group = group_for(data, row["condition"], row["age_band"], row["sex"])
    shown = next(t for t in group["treatments"] if t["id"] == row["treatment"])["flags"]
    codes = [c for c in row["flags"].split(";") if c != "observational"]
    assert [f["code"] for f in shown] == codes and [f["text"] for f in shown] == [FLAG_TEXT[c] for c in codes]


def test_near_matches_only_below_30_patients_and_only_groups_with_results(evidence):
    _, html = evidence
    data = embedded_data(html)
    bands = [b["id"] for b in data["age_bands"]]
    assert bands == ["18-39", "40-64", "65+"]  # the mapping's order, not the alphabet's

    cohort, group = group_for(data, *SMALL_COHORT)
    assert group["patients_n"] == 12
    near = [(data["groups"][n["group"]]["age_band"], data["groups"][n["group"]]["sex"], n["relation"]) for n in cohort["near"]]
    # the other sex in this band is the cohort nobody reported: it is not offered
    assert near == [("40-64", "male", "the next older age group")]

    cohort, group = group_for(data, *EMPTY_COHORT)
    assert group is None
    near = [(data["groups"][n["group"]]["age_band"], data["groups"][n["group"]]["sex"]) for n in cohort["near"]]
    assert near == [("40-64", "female"), ("18-39", "male")]

    cohort, group = group_for(data, "hypertension", "40-64", "female")
    assert group["patients_n"] >= 30 and cohort["near"] == []


def test_age_bands_follow_the_mappings_order_not_the_labels_text(tmp_path):
    """A children's band "5-17" sorts after "40-64" as text; ``age_band_order`` puts it first, for the
    age choice and for what counts as the next older group of a small cohort."""
    tables = write_evidence_tables(tmp_path)
    for name, frame in (("pooled_outcomes", tables["pooled"]), ("site_estimates", tables["per_site"])):
        frame["age_band"] = frame["age_band"].replace("18-39", "5-17")
        # rows in the labels' text order: only age_band_order can put the children's band first
        frame.sort_values("age_band", kind="stable").to_parquet(tmp_path / f"{name}.parquet", index=False)
    data = embedded_data(report.write_report(tmp_path).read_text(encoding="utf-8"))
    assert [b["id"] for b in data["age_bands"]] == ["5-17", "40-64", "65+"]
    assert data["age_bands"][0]["label"] == "5\u201317 years"
    cohort, group = group_for(data, SMALL_COHORT[0], "5-17", SMALL_COHORT[2])
    near = [(data["groups"][n["group"]]["age_band"], n["relation"]) for n in cohort["near"]]
    assert group["patients_n"] == 12 and near == [("40-64", "the next older age group")]


def test_each_measure_carries_its_unit_in_clinical_words_and_its_better_direction(evidence):
    _, html = evidence
    measures = embedded_data(html)["measures"]
    assert {m: (v["unit"], v["direction"]) for m, v in measures.items()} == {
        "systolic_bp": ("mmHg", "lower"), "hba1c": ("percentage points", "lower")}


def test_periods_are_offered_newest_first_where_a_condition_has_several(evidence):
    _, html = evidence
    choices = embedded_data(html)["choices"]
    assert [p["label"] for p in choices["hypertension"]["periods"]] == ["2024", "2023"]
    assert [p["label"] for p in choices["type2_diabetes"]["periods"]] == ["2024"]
    # 2023 was reported for one age band only: the others are empty for that period, not borrowed from 2024
    assert group_for(embedded_data(html), "hypertension", "65+", "male", "2023")[1] is None


def test_provenance_counts_and_plain_reasons(evidence):
    tables, html = evidence
    prov = embedded_data(html)["provenance"]
    assert prov["used"] == f"{tables['provenance']['packets_used']:,}" and prov["withheld"] == "8"
    assert prov["withheld_reasons"][0] == {"count": "5", "text": report.WITHHELD_TEXT["replay"]}
    assert [s["as_of"] for s in prov["sites"]] == ["1 Dec 2024"] * 4 + ["30 Sep 2024"]
    assert prov["run_date"] == "5 Dec 2024"


def test_every_reason_the_verifier_can_give_has_plain_words():
    assert set(REJECTED) <= set(report.WITHHELD_TEXT)
    assert not [t for t in report.WITHHELD_TEXT.values() if PROTOCOL_WORDS.search(t)]


def test_an_empty_network_builds_a_page_that_says_so(tmp_path):
    tables = write_evidence_tables(tmp_path)
    tables["pooled"].iloc[0:0].to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    tables["per_site"].iloc[0:0].to_parquet(tmp_path / "site_estimates.parquet", index=False)
    data = embedded_data(report.write_report(tmp_path).read_text(encoding="utf-8"))
    assert data["groups"] == [] and data["cohorts"] == [] and data["conditions"] == []


def test_a_missing_table_is_named(tmp_path):
    write_evidence_tables(tmp_path)
    (tmp_path / "site_estimates.parquet").unlink()
    with pytest.raises(InputNotFoundError, match="site_estimates.parquet") as err:
        report.write_report(tmp_path)
    assert err.value.exit_code == ExitCode.INPUT_NOT_FOUND
    assert not (tmp_path / "report.html").exists()


def test_a_table_without_a_column_the_report_reads_is_refused(tmp_path):
    tables = write_evidence_tables(tmp_path)
    tables["pooled"].drop(columns=["resp_re_lo"]).to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    with pytest.raises(EvidenceInvalidError, match="pooled_outcomes.parquet lacks resp_re_lo") as err:
        report.write_report(tmp_path)
    assert err.value.exit_code == ExitCode.EVIDENCE_INVALID


def test_a_flag_the_report_cannot_explain_is_refused(tmp_path):
    tables = write_evidence_tables(tmp_path)
    pooled = tables["pooled"]
    pooled.loc[0, "flags"] = "made_up_flag;observational"
    pooled.to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    with pytest.raises(EvidenceInvalidError, match="made_up_flag"):
        report.write_report(tmp_path)


def test_a_malformed_provenance_file_is_refused(tmp_path):
    write_evidence_tables(tmp_path)
    (tmp_path / "provenance.json").write_text('{"run_date": ', encoding="utf-8")
    with pytest.raises(EvidenceInvalidError, match="provenance.json is not valid JSON"):
        report.write_report(tmp_path)


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [(-12.34, 1, "\u221212.3"), (-0.04, 1, "0.0"), (0.456, 2, "0.46"), (float("nan"), 1, ""), (3.0, 1, "3.0")],
)
def test_signed_figures(value, decimals, text):
    assert report.fmt_num(value, decimals) == text


def test_decimals_follow_the_measures_spread():
    assert report.mean_decimals(pd.Series([11.0, 13.0, 12.0])) == 1  # systolic pressure, mmHg
    assert report.mean_decimals(pd.Series([0.8, 0.7, 0.9])) == 2  # HbA1c, percentage points
    assert report.mean_decimals(pd.Series([0.0, float("nan")])) == 1


def test_a_treatment_without_a_local_name_shows_its_shared_code(tmp_path):
    tables = write_evidence_tables(tmp_path)
    pooled = tables["pooled"]
    pooled.loc[pooled["treatment"] == "TX_0009", "treatment_display"] = None
    pooled.to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    data = embedded_data(report.write_report(tmp_path).read_text(encoding="utf-8"))
    names = {t["id"]: t["name"] for g in data["groups"] for t in g["treatments"]}
    assert names["TX_0009"] == "TX_0009 (no local name)" and names["TX_0005"] == "Metformin extended-release oral tablet"
