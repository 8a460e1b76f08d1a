"""The eval report in a real headless Chromium: it loads with no network request and screenshots cleanly.

Skipped when playwright or chromium is missing, unless ALIGN_REQUIRE_BROWSER=1 (then missing means failure).
ALIGN_REPORT_HTML=path screenshots that report instead of the tiny-model fixture; ALIGN_UPDATE_DOCS=1 saves the
screenshot's first DOCS_HEIGHT pixels to docs/report.png (the README's picture).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import build_fixture_report

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ALIGN_CHROMIUM", "/usr/bin/chromium")
DOCS_HEIGHT = 2300  # pixels of docs/report.png: the header, win rates and ranking
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, reason = None, "playwright is not installed (pip install playwright)"
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    if reason:
        if os.environ.get("ALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ALIGN_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_playwright


def test_report_opens_offline_and_screenshots(tmp_path_factory, tiny_model_dir):
    sync_playwright = _browser_or_skip()
    given = os.environ.get("ALIGN_REPORT_HTML")
    html = Path(given).resolve() if given else build_fixture_report(tmp_path_factory, tiny_model_dir)[0]
    url = html.as_uri()
    shot = tmp_path_factory.mktemp("screenshot") / "report.png"
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})  # a laptop screen
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url, wait_until="load")
            assert page.title().startswith("align")
            for section in ("win_rates", "gold", "failures", "side_by_side", "kl", "lengths"):
                assert page.locator(f"section#{section}").count() == 1, section
            # Every plot decoded (a broken data: URI has naturalWidth 0) and fits the page width.
            sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.getBoundingClientRect().right])")
            assert sizes and all(w > 0 for w, _ in sizes)
            assert all(right <= 1366 for _, right in sizes)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1366  # no sideways scrolling
            page.screenshot(path=str(shot), full_page=True)
            # The section links wrap: a full demo report has 15 of them, wider than a laptop screen on one line.
            page.set_viewport_size({"width": 480, "height": 900})
            nav = page.eval_on_selector("nav", "e => [e.scrollWidth, e.clientWidth, e.children.length]")
            assert nav[2] >= 5 and nav[0] <= nav[1], nav
        finally:
            browser.close()
    external = [u for u in requests if not (u.startswith(("data:", "about:")) or u == url)]
    assert not external, f"the report made network requests: {external}"
    assert shot.stat().st_size > 10_000
    if os.environ.get("ALIGN_UPDATE_DOCS") == "1":  # the README's picture: the report's first screens, not all 16k px
        from PIL import Image

        (ROOT / "docs").mkdir(exist_ok=True)
        with Image.open(shot) as full:
            full.crop((0, 0, full.width, min(full.height, DOCS_HEIGHT))).save(ROOT / "docs" / "report.png", optimize=True)
