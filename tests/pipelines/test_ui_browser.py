"""The asset lineage in the Dagster UI, as a data engineer opens it: ``dagster dev`` in headless chromium.

``python -m pipelines.dev`` (what docs/dagster.md tells an operator to run) starts ``dagster dev`` on a
free port of 127.0.0.1 with a throwaway DAGSTER_HOME; the test waits for the webserver by polling it,
opens the global asset lineage, checks that every asset key of ``pipelines.definitions`` is drawn, keeps
a screenshot in test-artifacts/, and stops the whole process group (the dagster dev process, its
webserver, daemon and code server), checking with psutil that none of them is left.
"""

from __future__ import annotations

import re
import time

import pytest

from pipelines.dev import START_DEADLINE, free_port, start_dev, stop_dev, wait_for_ui


@pytest.fixture
def dagster_dev(tmp_path):
    """``python -m pipelines.dev`` in its own session on 127.0.0.1; yields the UI's base URL."""
    home = tmp_path / "dagster_home"
    port = free_port()
    proc = start_dev(home, port, tmp_path / "dagster-dev.log")
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_ui(f"{base}/server_info", proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(str(exc))
        yield base
    finally:
        left = stop_dev(proc)
        assert left == [], f"dagster dev left processes running: {left}"
    assert (home / "dagster.yaml").exists()  # the wrapper prepared the throwaway home, not .dagster_home


def lineage_of_definitions() -> tuple[list[str], list[str]]:
    """The asset names and asset groups of the code location, read from its Definitions."""
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    return sorted(key.to_user_string() for key in keys), sorted({graph.get(key).group_name for key in keys})


def expand_all_groups(page, deadline: float = 90.0) -> None:
    """Open the graph's own menu (a right-click on its empty background) and pick "Expand all groups".

    The graph ignores a right-click while it is still laying itself out after the code location loads,
    so the click is repeated, each time waiting up to 3 s for the menu (it takes over a second on a
    loaded 2-core machine), within ``deadline``. The UI
    opens the graph with its groups expanded or collapsed depending on its size; when the menu offers
    only "Collapse all groups", every group is open already."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout  # a dev dependency: see ``browser``

    # not exact: the visible menu item's text also holds its keyboard shortcut
    expand = page.get_by_text("Expand all groups").filter(visible=True)
    either = page.get_by_text(re.compile(r"(Expand|Collapse) all groups")).filter(visible=True)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        page.locator("body").click(button="right", position={"x": 1400, "y": 250})
        try:
            either.first.wait_for(timeout=3000)
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
            continue
        if expand.count():
            expand.first.click()
        else:
            page.keyboard.press("Escape")
        return
    pytest.fail(f"the lineage graph's menu did not open within {deadline:.0f} s")


def test_the_asset_lineage_shows_every_asset(dagster_dev, browser, artifacts_dir):
    names, groups = lineage_of_definitions()
    assert {"fhir_export", "fhir_observations", "fhir_medication_requests", "outcome_packets", "published_packets", "evidence_tables"} <= set(names)
    # wide enough that the fitted graph draws full names, tall enough that every expanded group is inside
    # the viewport (the UI draws only the nodes in view)
    page = browser.new_page(viewport={"width": 2560, "height": 2400})
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((dagster_dev, f"blob:{dagster_dev}/", "data:")) else outside.append(r.url))
    timeout_ms = START_DEADLINE * 1000

    def visible(text: str):
        return page.get_by_text(text, exact=True).filter(visible=True)

    try:
        page.goto(f"{dagster_dev}/asset-groups", wait_until="domcontentloaded")
        # the graph is drawn once the code location has loaded in its own process; it opens with each
        # group collapsed to one box, and the groups listed beside it: wait for both (the 2nd of each name)
        for group in groups:
            visible(group).nth(1).wait_for(timeout=timeout_ms)
        expand_all_groups(page)
        for name in names:
            visible(name).first.wait_for(timeout=30_000)  # the graph is laid out: names follow within seconds
        shown = {name: visible(name).count() > 0 for name in names}
    finally:
        page.screenshot(path=str(artifacts_dir / "dagster-asset-lineage.png"), full_page=True)  # kept on failure too
        page.close()
    assert shown == dict.fromkeys(names, True)
    assert outside == []  # telemetry and the sign-up prompt are off: the UI asks nothing of the internet
