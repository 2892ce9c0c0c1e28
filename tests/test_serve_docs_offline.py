"""`/docs` and `/redoc` work offline: in Chromium with every request off the server refused, both pages render
the API's operations from assets the server itself serves."""
import os

import pytest

pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} does not exist; install it with `apt-get install -y chromium`", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


def test_docs_and_redoc_render_with_the_network_blocked(tmp_path):
    app = create_app(load_base(), tmp_path)
    with background_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            ctx = browser.new_context()
            blocked, served = [], []

            def route(r):  # the network: only the server itself answers
                if r.request.url.startswith(url):
                    served.append(r.request.url)
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            ctx.route("**/*", route)
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "docs")
            page.wait_for_selector(".swagger-ui .opblock-summary-path")
            paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
            assert "/api/auto" in paths and "/api/segment" in paths and "/api/images" in paths, paths
            page.goto(url + "redoc")
            page.wait_for_selector("[data-section-id^='operation/']", state="attached")
            titles = page.inner_text("body")
            assert "/api/auto" in titles and "samadapt serve" in titles
            assert blocked == [], blocked  # nothing was asked of another host (no CDN, no fonts)
            assert any("/static-docs/swagger-ui-bundle.js" in u for u in served)
            assert any("/static-docs/redoc.standalone.js" in u for u in served)
        finally:
            browser.close()
