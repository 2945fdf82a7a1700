"""The page in a real browser: headless Chromium opens it, generates an image and screenshots every tab.

Screenshots go to the test's ``tmp_path``; with ``UPDATE_SCREENSHOTS=1`` they are also copied to
``examples/screenshots/`` (the README links them). Without ``/usr/bin/chromium`` the test skips,
unless ``REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from test_app import REPO, make_tiny_model, serve_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = REPO / "examples" / "screenshots"
BUNDLED_MODEL = REPO / "models" / "tiny-shapes"
TIMEOUT_MS = 90_000


def _browser_or_skip():
    """Playwright's sync API, or a skip (a failure under REQUIRE_BROWSER=1) saying what is missing."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            reason = "the playwright package is missing (pip install playwright)"
    if reason is None:
        return sync_playwright
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.mark.browser
def test_page_generates_and_screenshots_every_tab(tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    # The bundled trained model draws recognisable shapes (better screenshots); a random one noise.
    model = BUNDLED_MODEL if BUNDLED_MODEL.is_dir() else make_tiny_model(tmp_path / "tiny-random")
    shots = {}
    with serve_app("--model", str(model), "--device", "cpu", "--dtype", "float32", log=tmp_path / "app.log") as url, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)

            page.locator("#t2i-prompt textarea").fill("a red circle on a blue background")
            _set_slider(page, "#t2i-steps", 8)
            page.locator("#t2i-generate").click()
            page.locator("#t2i-gallery img").first.wait_for(state="visible")
            _wait_for_textarea_containing(page, "Seed:")  # the parameters of the finished image
            shots["text-to-image"] = _screenshot(page, tmp_path)

            page.get_by_role("tab", name="Image to image").click()
            page.locator("#i2i-prompt textarea").wait_for(state="visible")
            page.get_by_text("a purple square on a yellow background").first.click()  # an example: image + prompt
            page.locator("#i2i-input img").first.wait_for(state="visible")
            _set_slider(page, "#i2i-steps", 8)
            page.locator("#i2i-generate").click()
            page.locator("#i2i-gallery img").first.wait_for(state="visible")
            shots["image-to-image"] = _screenshot(page, tmp_path)

            page.get_by_role("tab", name="Noise schedule").click()
            page.locator("#noise-plot img").first.wait_for(state="visible")
            page.locator("#noise-run").click()
            page.locator("#noise-pixels img").first.wait_for(state="visible")
            page.locator("#noise-latents img").first.wait_for(state="visible")
            shots["noise-schedule"] = _screenshot(page, tmp_path)
        finally:
            browser.close()

    for name, path in shots.items():
        assert path.stat().st_size > 10_000, f"{name}: suspiciously small screenshot"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for path in shots.values():
            # 256 colours keep the text crisp at a quarter of the size: lighter in the repository.
            with Image.open(path) as shot:
                shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                    SCREENSHOTS / path.name, optimize=True)


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _wait_for_textarea_containing(page, text: str) -> None:
    page.wait_for_function(
        "text => [...document.querySelectorAll('textarea')].some(t => t.value.includes(text))", arg=text,
        timeout=TIMEOUT_MS,
    )


def _screenshot(page, folder: Path) -> Path:
    # Let images and plots finish painting after their elements appear (Gradio keeps a stream
    # open, so the network never goes idle to wait for).
    page.wait_for_timeout(1500)
    name = page.get_by_role("tab", selected=True).inner_text().strip().lower().replace(" ", "-")
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
