"""The Inpaint tab in a real browser: load a picture, paint the mask with the brush, outpaint, screenshot.

Uses test_browser's browser and helpers; the screenshot goes to the test's ``tmp_path`` and, with
``UPDATE_SCREENSHOTS=1``, to ``examples/screenshots/inpaint.png`` (the README shows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import make_tiny_model, serve_app
from test_browser import (
    BUNDLED_MODEL,
    CHROMIUM,
    CHROMIUM_ARGS,
    SCREENSHOTS,
    TIMEOUT_MS,
    _browser_or_skip,
    _screenshot,
    _set_slider,
    _wait_for_textarea_containing,
)


@pytest.mark.browser
def test_inpaint_tab_paints_a_mask_outpaints_and_screenshots(tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    model = BUNDLED_MODEL if BUNDLED_MODEL.is_dir() else make_tiny_model(tmp_path / "tiny-random")
    with serve_app("--model", str(model), "--device", "cpu", "--dtype", "float32", log=tmp_path / "app.log") as url, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("tab", name="Inpaint").click()
            page.locator("#inp-prompt textarea").wait_for(state="visible")
            # The outpainting example: the picture without a mask, and 128 px more on the right.
            page.get_by_text("a blue square on a white background").first.click()
            canvas = page.locator("#inp-editor canvas").first
            canvas.wait_for(state="visible")
            page.wait_for_timeout(1500)  # the editor draws the picture
            _paint_over_the_middle(page, canvas)
            page.get_by_text("Outpaint: extend the canvas").click()  # shows the example's 128 px on the right
            page.locator("#inp-prompt textarea").fill("a green triangle on a white background")
            _set_slider(page, "#inp-steps", 8)
            page.get_by_label("Seed (-1: random)").filter(visible=True).fill("4")  # a seed that draws it well
            page.locator("#inp-generate").click()
            page.locator("#inp-gallery img").first.wait_for(state="visible")
            _wait_for_textarea_containing(page, "Mask blur: 4")
            result = _gallery_image(page, tmp_path)
            shot = _screenshot(page, tmp_path)
        finally:
            browser.close()

    picture = np.asarray(Image.open(SCREENSHOTS.parent / "images" / "square.png").convert("RGB"), dtype=np.int16)
    assert result.shape == (512, 640, 3)  # 128 px more on the right
    # The corners of the picture are outside the painted mask: kept bit for bit; its middle is repainted.
    for corner in (np.s_[:48, :48], np.s_[-48:, :48], np.s_[:48, 440:488]):
        np.testing.assert_array_equal(result[corner], picture[corner])
    assert np.abs(result[:, :512] - picture)[230:290, 220:280].mean() > 20, "the painted middle was not repainted"
    assert shot.name == "inpaint.png" and shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        with Image.open(shot) as image:
            image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(SCREENSHOTS / shot.name,
                                                                                     optimize=True)


def _paint_over_the_middle(page, canvas) -> None:
    """Brush strokes, side by side, over the middle of the picture (the bundled model's latent pixel is 64 px)."""
    canvas.scroll_into_view_if_needed()  # the example row is at the bottom of the page
    page.locator("#inp-editor button[aria-label=Brush]").click()
    box = canvas.bounding_box()
    # The picture is shown zoomed to fit, centred in the canvas.
    x, y, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["height"]
    for i in range(9):
        row = y + side * (-0.2 + 0.05 * i)
        page.mouse.move(x - side * 0.25, row)
        page.mouse.down()
        page.mouse.move(x + side * 0.25, row, steps=8)
        page.mouse.up()


def _gallery_image(page, folder: Path) -> np.ndarray:
    """The first result, fetched from the page as the browser got it."""
    source = page.locator("#inp-gallery img").first.get_attribute("src")
    response = page.request.get(source)
    path = folder / "result.png"
    path.write_bytes(response.body())
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
