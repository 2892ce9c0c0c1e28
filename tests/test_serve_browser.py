"""The interactive page in a real headless browser (Chromium via Playwright) against a real server
on loopback: open an image with the file input, click a point, see the mask and score, switch the
adapter and see the mask change, negative points, a dragged box, clear -- with the server's Host and
origin checks on: the page's own uploads carry its Origin and pass, and an upload from a page of
another origin (the same server under its other loopback name) is refused. The mask the page draws
is checked against `AdapterBank.predict` through the page's `data-mask-hash`. Saves a screenshot
under the test's tmp dir and copies it to benchmarks/serve_page.png when SAMADAPT_UPDATE_SCREENSHOT=1.

Needs `playwright` (pip) and /usr/bin/chromium (apt-get install chromium); skipped otherwise.
"""
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} does not exist; install it with `apt-get install -y chromium` to run the browser test",
                allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402
from test_serve import NAMES, best_mask, make_core_and_adapters, mask_hash, scene  # noqa: E402

from samadapt.adapters import AdapterBank  # noqa: E402
from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402

W, H = 320, 240
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_page.png"
TIMEOUT_MS = 30_000


def test_page_in_browser(tmp_path):
    ckpt, folder = make_core_and_adapters(tmp_path)
    img = scene(H, W, seed=3)
    path = tmp_path / "scene.png"
    Image.fromarray(img).save(path)
    ref = AdapterBank(load_base(str(ckpt)), folder)
    app = create_app(load_base(str(ckpt)), folder)

    with background_server(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.set_default_timeout(TIMEOUT_MS)
            foreign, problems = [], []
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else foreign.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)") == ["", *NAMES]
            assert "open an image" in page.inner_text("#status")

            # the folder is live: a dropped file appears after a refresh, a removed one disappears
            shutil.copy(folder / "seg_a.safetensors", folder / "seg_new.safetensors")
            page.click("#refresh")
            page.wait_for_function("() => document.querySelectorAll('#adapter option').length === 5")
            (folder / "seg_new.safetensors").unlink()
            page.click("#refresh")
            page.wait_for_function("() => document.querySelectorAll('#adapter option').length === 4")

            is_upload = lambda r: r.url.endswith("/api/images")  # noqa: E731
            with page.expect_request_finished(is_upload) as sent:
                page.set_input_files("#file", str(path))
            page.wait_for_function("() => document.querySelector('#canvas').dataset.imageId")
            # the page's own writes carry its Origin: the server's cross-origin check lets them through
            headers, status = sent.value.all_headers(), sent.value.response().status
            assert status == 200 and headers.get("origin") == url.rstrip("/"), headers
            assert headers.get("sec-fetch-site") == "same-origin", headers
            assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [W, H]
            rect = page.locator("#canvas").bounding_box()

            def at(x, y):  # image pixels -> position on the displayed canvas
                return {"x": x * rect["width"] / W, "y": y * rect["height"] / H}

            def shown(adapter):
                page.wait_for_function(
                    "a => document.body.dataset.state === 'ready'"
                    " && document.querySelector('#canvas').dataset.maskHash"
                    " && document.querySelector('#canvas').dataset.adapter === a",
                    arg=adapter or "",
                )
                status = page.inner_text("#status")
                assert re.search(r"^mask \d/\d score -?\d+\.\d\d", status), status
                assert (adapter or "plain core") in status
                points = page.evaluate("() => S.points")
                box = page.evaluate("() => S.box")
                want, n = best_mask(ref, img, adapter, points, box)
                assert f"/{n} " in status
                got = page.get_attribute("#canvas", "data-mask-hash")
                assert got == mask_hash(want), (adapter, points, box)
                return got

            # one positive click under the plain core
            page.click("#canvas", position=at(96, 108))
            h_core = shown(None)
            assert page.locator("#masks button").count() == 3

            # switching the adapter re-runs the same prompt: a different mask
            for name in NAMES:
                page.select_option("#adapter", name)
                h = shown(name)
                assert h != h_core, f"{name} gave the plain core's mask"

            # negative points: shift-click and right-click
            page.click("#canvas", position=at(250, 60), modifiers=["Shift"])
            shown(NAMES[-1])
            page.click("#canvas", position=at(40, 200), button="right")
            shown(NAMES[-1])
            assert [p[2] for p in page.evaluate("() => S.points")] == [1, 0, 0]

            # drag = box
            rect = page.locator("#canvas").bounding_box()
            x0, y0 = rect["x"] + at(180, 40)["x"], rect["y"] + at(180, 40)["y"]
            x1, y1 = rect["x"] + at(300, 180)["x"], rect["y"] + at(300, 180)["y"]
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x1, y1, steps=8)
            page.mouse.up()
            shown(NAMES[-1])
            box = page.evaluate("() => S.box")
            assert box is not None and abs(box[0] - 180) < 2 and abs(box[3] - 180) < 2, box

            # undo removes the box again (Z), then the box comes back by dragging once more
            page.keyboard.press("z")
            page.wait_for_function("() => S.box === null && document.body.dataset.state === 'ready'")
            assert page.evaluate("() => S.points.length") == 3

            # segment everything: a status line with the number of masks, or which slider to lower when none passed
            page.click("#auto")
            page.wait_for_function(
                "() => /masks \\(everything\\)|^0 masks passed/.test(document.querySelector('#status').textContent)"
            )

            # another candidate mask from the chips, then clear
            page.click("#canvas", position=at(96, 108))
            shown(NAMES[-1])
            page.click("#masks button:nth-child(1)")
            page.wait_for_function("() => document.querySelector('#canvas').dataset.maskIndex === '0'")
            assert page.inner_text("#status").startswith("mask 1/3 score")
            page.click("#clear")
            assert page.get_attribute("#canvas", "data-mask-hash") == ""
            assert page.evaluate("() => S.points.length") == 0 and page.evaluate("() => S.box") is None

            # a final scene for the screenshot: object click + box under the first adapter
            page.select_option("#adapter", NAMES[0])
            page.click("#canvas", position=at(96, 108))
            shown(NAMES[0])
            page.click("#canvas", position=at(230, 200), modifiers=["Shift"])
            shown(NAMES[0])
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)

            # a page of another origin (the same server under its other loopback name) cannot write to this
            # one: its multipart upload, sent the way a hostile form would (no-cors), is refused and stores nothing
            other = url.replace("127.0.0.1", "localhost")
            evil = browser.new_page()
            evil.goto(other + "api/health")  # a document of that origin without the page's CSP (connect-src 'self')
            held = len(app.state.images)
            with evil.expect_response(is_upload) as sent:
                evil.evaluate("""async (target) => {
                    const fd = new FormData();
                    fd.append("file", new Blob([new Uint8Array(64)], {type: "image/png"}), "x.png");
                    await fetch(target + "api/images", {method: "POST", body: fd, mode: "no-cors"});
                }""", url)
            assert sent.value.status == 403, sent.value.request.all_headers()
            assert len(app.state.images) == held
            evil.close()
        finally:
            browser.close()

    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    assert not problems, f"console errors: {problems}"
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAMADAPT_UPDATE_SCREENSHOT") == "1":  # refresh the committed picture on request only
        shutil.copyfile(shot, SCREENSHOT)
