"""Shared test helpers: where the read-only Synthea fixtures live.

The fixtures sit beside the checkout (`<repo>/../shared/fixtures`) and are never copied into the
project; tests that need them skip with a reason when the folder is absent.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`<repo>/../shared/fixtures`, or skip when the Synthea fixtures are not on this machine."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"Synthea fixtures not found at {FIXTURES_DIR.resolve()} (see README: tests)")
    return FIXTURES_DIR.resolve()


@pytest.fixture(scope="session")
def require():
    """``require(ok, reason)``: skip the test when ``ok`` is false (root, a binary, a kernel feature
    missing here), except under CI (env ``CI=true``), where the machine is set up to run it and a
    skip would hide a test that never ran: there it fails instead."""

    def check(ok: bool, reason: str) -> None:
        if ok:
            return
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason} (CI=true: this test must run here; see .ci/run)")
        pytest.skip(reason)

    return check


CHROMIUM = Path("/usr/bin/chromium")
# no update checks, metrics, translation, safe-browsing or other traffic of the browser's own
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--no-first-run", "--no-default-browser-check", "--metrics-recording-only", "--disable-breakpad",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser(require):
    """Debian's chromium (``/usr/bin/chromium``) driven by playwright, headless, one per test module.

    Not one per session: playwright's sync API keeps an asyncio loop running in the main thread while it
    is open, and every later ``asyncio.run`` there (the DHT client's publish and query) then fails.

    Skips without chromium or playwright, except under CI (``require``), where it fails."""
    require(CHROMIUM.exists(), f"{CHROMIUM} not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright not installed (uv sync --extra dev)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/`` in the checkout (git-ignored): screenshots a reviewer looks at after a run."""
    path = REPO_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []  # (path, content type, JSON body) per POST
    bodies: list = []  # the JSON bodies alone
    status = 204

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        type(self).bodies.append(json.loads(body))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """A webhook receiver on 127.0.0.1, a free port, in a thread; shut down after the test."""
    handler = type("Receiver", (_Receiver,), {"received": [], "bodies": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
