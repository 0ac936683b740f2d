"""The evidence report in a real browser (Debian's chromium, driven by playwright): what a clinician sees.

Every request but the report file itself is refused and recorded; the test proves the recorder works
(a control page that does ask for a remote image) before trusting that the report asked for nothing.
Skips when chromium or playwright is missing, except under CI (CI=true), where it fails (the
``browser`` fixture in tests/conftest.py).
A full-page screenshot is kept in the test's tmp_path and copied to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import re
import shutil

import pandas as pd
from report_tables import EMPTY_COHORT, SMALL_COHORT, write_evidence_tables

from qis_fhir.evidence.flags import FLAG_TEXT
from qis_fhir.evidence.report import write_report

EVIL = "</script><script>alert(1)</script>"
PROTOCOL_WORDS = re.compile(r"\b(dht|packets?|fingerprints?|nodes?|seq|kademlia)\b", re.IGNORECASE)


class Watch:
    """A page whose every request except ``allowed`` is aborted and recorded, with its errors and dialogs."""

    def __init__(self, browser, allowed: str | None):
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.allowed = allowed

    def _route(self, route):
        if route.request.url == self.allowed:
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()


def test_the_request_recorder_sees_a_remote_request(browser):
    """The control for the report test below: an empty list there means no request, not a deaf recorder."""
    watch = Watch(browser, allowed=None)
    try:
        watch.page.set_content('<img src="http://203.0.113.7/x.png" alt="">')
        watch.page.wait_for_function("document.images[0].complete")
        assert watch.refused == ["http://203.0.113.7/x.png"]
    finally:
        watch.page.close()


def figures(page) -> list[dict]:
    """The ranked table as shown: one dict per row, in order."""
    return page.eval_on_selector_all(
        "#cohort table.ranked tbody tr",
        """rows => rows.map(r => ({
            id: r.dataset.treatment,
            rank: r.querySelector('.rank').textContent,
            name: r.querySelector('.tname').textContent,
            patients: r.querySelector('.patients').textContent,
            sites: r.querySelector('.sites').textContent,
            resp_pooled: r.querySelector('.resp-pooled .val').textContent,
            resp_pooled_ci: r.querySelector('.resp-pooled .ci').textContent,
            resp_re: r.querySelector('.resp-re .val, .resp-re .na').textContent,
            resp_re_ci: (r.querySelector('.resp-re .ci') || {}).textContent || '',
            resp_pi: (r.querySelector('.resp-re .pi') || {}).textContent || '',
        }))""",
    )


def expected(pooled: pd.DataFrame, cohort: tuple[str, str, str], period: str = "2024") -> list[dict]:
    rows = pooled[(pooled[["condition", "age_band", "sex", "period"]] == [*cohort, period]).all(axis=1)].sort_values("rank")
    return [
        {
            "id": r.treatment, "rank": str(r.rank), "name": r.treatment_display, "patients": f"{r.patients:,}",
            "sites": str(r.sites), "resp_pooled": f"{r.resp_pooled * 100:.1f}%",
            "resp_pooled_ci": f"{r.resp_pooled_lo * 100:.1f}% to {r.resp_pooled_hi * 100:.1f}%",
            "resp_re": "needs 2 or more hospitals" if r.sites < 2 else f"{r.resp_re * 100:.1f}%",
            "resp_re_ci": "" if r.sites < 2 else f"{r.resp_re_lo * 100:.1f}% to {r.resp_re_hi * 100:.1f}%",
            "resp_pi": "" if r.sites < 3 else f"another hospital: {r.resp_pi_lo * 100:.1f}% to {r.resp_pi_hi * 100:.1f}%",
        }
        for r in rows.itertuples()
    ]  # fmt: skip


def choose(page, cohort: tuple[str, str, str]) -> None:
    page.select_option("#condition", cohort[0])
    page.select_option("#age-band", cohort[1])
    page.select_option("#sex", cohort[2])


def test_a_clinician_picks_cohorts_and_sees_the_tables_figures(browser, tmp_path, artifacts_dir):
    evidence_dir = tmp_path / "evidence"
    write_evidence_tables(evidence_dir, treatment_names={"TX_0002": EVIL})
    url = write_report(evidence_dir).resolve().as_uri()
    # what the test compares against: the tables as written, read back from disk
    pooled = pd.read_parquet(evidence_dir / "pooled_outcomes.parquet")
    per_site = pd.read_parquet(evidence_dir / "site_estimates.parquet")

    watch = Watch(browser, allowed=url)
    page = watch.page
    try:
        page.goto(url)
        page.wait_for_selector("#cohort table.ranked")
        seen_text = [page.inner_text("body")]

        first, second = ("hypertension", "40-64", "female"), ("type2_diabetes", "65+", "male")
        choose(page, first)
        shown_first = figures(page)
        assert shown_first == expected(pooled, first)
        assert EVIL in [row["name"] for row in shown_first]  # shown as text, not run
        # this condition and band were also reported for 2023: a period choice appears, newest first
        assert page.is_visible("#period") and page.eval_on_selector("#period", "s => s.options[s.selectedIndex].text") == "2024"
        page.select_option("#period", label="2023")
        assert figures(page) == expected(pooled, first, "2023") != shown_first
        page.select_option("#period", label="2024")
        choose(page, second)
        shown_second = figures(page)
        assert shown_second == expected(pooled, second) and shown_second != shown_first
        assert page.is_hidden("#period-field")  # one period only: no choice to make
        seen_text.append(page.inner_text("body"))

        # the forest plot of the first-ranked treatment: one line per hospital that reported it
        top = pooled[(pooled[["condition", "age_band", "sex", "period"]] == [*second, "2024"]).all(axis=1)].sort_values("rank").iloc[0]
        card = f"#treatment-{top['treatment']}"
        cell = per_site[(per_site[["condition", "age_band", "sex", "period", "treatment"]] == [*second, "2024", top["treatment"]]).all(axis=1)]
        labels = page.eval_on_selector_all(f"{card} svg.forest text.site", "ts => ts.map(t => t.textContent)")
        assert [label.split(" (")[0] for label in labels] == sorted(cell["site"])
        # the mean change's axis says which way is better (lower HbA1c), from the table's measure_direction
        axis = page.eval_on_selector_all(f"{card} svg.forest text.dir", "ts => ts.map(t => t.textContent)")
        assert axis[2:] == ["\u2190 better: reading fell", "reading rose \u2192"]
        flags = page.eval_on_selector_all(f"{card} li[data-flag]", "ls => ls.map(l => l.textContent)")
        assert flags == [FLAG_TEXT[c] for c in top["flags"].split(";") if c != "observational"]
        assert page.inner_text("#observational").startswith(FLAG_TEXT["observational"])
        assert page.inner_text("#wider") == ""  # enough patients: no wider evidence

        # fewer than 30 patients: the nearby groups, clearly labelled as wider evidence
        choose(page, SMALL_COHORT)
        assert page.locator("#wider .near").count() == 1
        heading = page.text_content("#wider .near h3")
        assert heading.startswith("Wider evidence") and "Male \u00b7 40\u201364 years" in heading
        seen_text.append(page.inner_text("body"))
        page.screenshot(path=str(tmp_path / "small-cohort.png"), full_page=True)

        # nobody reported this group: it says so in words, and offers the groups next to it
        choose(page, EMPTY_COHORT)
        assert "No hospital reported this group" in page.inner_text("#cohort-empty")
        assert page.locator("#wider .near").count() == 2
        assert page.locator("#cohort svg").count() == 0

        choose(page, first)
        page.screenshot(path=str(tmp_path / "evidence-report.png"), full_page=True)
        seen_text.append(page.inner_text("body"))
    finally:
        page.close()

    for shot in ("evidence-report.png", "small-cohort.png"):
        shutil.copy(tmp_path / shot, artifacts_dir / shot)
    assert watch.refused == [] and watch.dialogs == [] and watch.errors == []
    assert [m.group(0) for text in seen_text for m in PROTOCOL_WORDS.finditer(text)] == []


def test_a_network_with_no_results_yet_says_so(browser, tmp_path):
    tables = write_evidence_tables(tmp_path)
    tables["pooled"].iloc[0:0].to_parquet(tmp_path / "pooled_outcomes.parquet", index=False)
    tables["per_site"].iloc[0:0].to_parquet(tmp_path / "site_estimates.parquet", index=False)
    url = write_report(tmp_path).resolve().as_uri()
    watch = Watch(browser, allowed=url)
    try:
        watch.page.goto(url)
        assert watch.page.text_content("#cohort-empty") == "No hospital has reported any results yet."
        assert watch.page.is_hidden("#controls") and watch.page.is_visible("#provenance-sites")
    finally:
        watch.page.close()
    assert watch.refused == [] and watch.errors == []
