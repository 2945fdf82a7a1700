"""The page in a real browser: headless Chromium opens it, generates an image and screenshots every tab.

At 1400 px wide it also checks what a first look would catch: labels on one line, the sampler's
name whole beside its arrow, no label badge over a plot or a thumbnail, and the PNG info tab
filling text to image. It runs a generation with the inside views (the denoising, where guidance
pushes, word maps), shows another image's by clicking it, and draws the sampler paths.

Screenshots go to the test's ``tmp_path``; with ``UPDATE_SCREENSHOTS=1`` they are also copied to
``examples/screenshots/`` (the README links them): one per tab, and the inside views and the
sampler paths on their own. Without ``/usr/bin/chromium`` the test skips,
unless ``REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import HUB_LAYOUTS
from PIL import Image
from safetensors.torch import save_file
from test_app import REPO, WEB_UI_EXAMPLE, make_tiny_model, serve_app

from stable_diffusion.taesd import TAESDConfig, TinyAutoencoder

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = REPO / "examples" / "screenshots"
BUNDLED_MODEL = REPO / "models" / "tiny-shapes"
TIMEOUT_MS = 90_000


@contextlib.contextmanager
def _opened(playwright, url: str) -> Iterator:
    """A 1400 px wide page of headless Chromium at ``url``."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
    finally:
        browser.close()


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
            sync_playwright() as playwright, _opened(playwright, url) as page:
        page.locator("#t2i-prompt textarea").fill("a red circle on a blue background")
        _set_slider(page, "#t2i-steps", 8)
        page.locator("#t2i-generate").click()
        page.locator("#t2i-gallery img").first.wait_for(state="visible")
        _wait_for_textarea_containing(page, "Seed:")  # the parameters of the finished image
        _check_controls_layout(page, "t2i")
        _check_numbers_shown_whole(page)
        for elem_id in ("t2i-gallery", "t2i-preview"):
            _check_label_clear_of_content(page, elem_id)
        _show_the_inside(page)
        shots["text-to-image"] = _screenshot(page, tmp_path)
        shots["inside-the-generation"] = _element_screenshot(page, "t2i-inside-views",
                                                             tmp_path / "inside-the-generation.png")
        _choose_the_second_image(page)

        page.get_by_role("tab", name="Image to image").click()
        page.locator("#i2i-prompt textarea").wait_for(state="visible")
        page.get_by_text("a purple square on a yellow background").first.click()  # an example: image + prompt
        page.locator("#i2i-input img").first.wait_for(state="visible")
        _set_slider(page, "#i2i-steps", 8)
        page.locator("#i2i-generate").click()
        page.locator("#i2i-gallery img").first.wait_for(state="visible")
        _check_controls_layout(page, "i2i")
        shots["image-to-image"] = _screenshot(page, tmp_path)

        page.get_by_role("tab", name="Noise schedule").click()
        page.locator("#noise-plot img").first.wait_for(state="visible")
        page.locator("#noise-run").click()
        page.locator("#noise-pixels img").first.wait_for(state="visible")
        page.locator("#noise-latents img").first.wait_for(state="visible")
        for elem_id in ("noise-plot", "noise-pixels", "noise-latents"):
            _check_label_clear_of_content(page, elem_id)
        _check_numbers_shown_whole(page)  # "Training steps T": 1000
        _draw_one_step_paths(page)
        shots["noise-schedule"] = _screenshot(page, tmp_path)
        shots["sampler-paths"] = _element_screenshot(page, "sampler-paths", tmp_path / "sampler-paths.png")

        shots["png-info"] = _png_info_sends_to_text_to_image(page, tmp_path)

    for name, path in shots.items():
        assert path.stat().st_size > 10_000, f"{name}: suspiciously small screenshot"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for path in shots.values():
            # 256 colours keep the text crisp at a quarter of the size: lighter in the repository.
            with Image.open(path) as shot:
                shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                    SCREENSHOTS / path.name, optimize=True)


@pytest.mark.browser
def test_model_picker_and_lora_list(tmp_path: Path) -> None:
    """Insert a LoRA tag from the list, refresh the list, load a few-step model: the page takes its defaults."""
    sync_playwright = _browser_or_skip()
    model = make_tiny_model(tmp_path / "tiny-random")
    turbo = make_tiny_model(tmp_path / "tiny-turbo")
    shutil.copyfile(HUB_LAYOUTS / "sd-turbo" / "scheduler" / "scheduler_config.json",
                    turbo / "scheduler" / "scheduler_config.json")
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, loras / "tiny-style.safetensors")  # the list reads names
    with serve_app("--model", str(model), "--device", "cpu", "--dtype", "float32", "--lora-dir", str(loras),
                   "--tiny-vae", str(_tiny_taesd(tmp_path / "taesd")), log=tmp_path / "app.log") as url, \
            sync_playwright() as playwright, _opened(playwright, url) as page:
        page.locator("#header").get_by_text("tiny-random").wait_for(state="visible")
        _check_no_error_shown(page)  # the page's refresh on opening leaves it as it is
        assert page.locator("#t2i-lora input").input_value() == "tiny-style"
        page.locator("#t2i-prompt textarea").fill("a red circle")
        page.locator("#t2i-lora-insert").click()
        _wait_for_textarea_containing(page, "a red circle <lora:tiny-style:0.8>")
        save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, loras / "another-style.safetensors")
        page.locator("#t2i-lora-refresh").click()
        page.wait_for_function("() => document.querySelector('#t2i-lora input').value === 'another-style'")
        assert page.locator("#t2i-decoder input").input_value() == "Full VAE"  # a 20-step model
        _check_controls_layout(page, "t2i", extra=("lora", "decoder"))

        picker = page.locator("#model-picker input")
        picker.fill(str(turbo))
        picker.press("Enter")
        page.locator("#model-load").click()
        page.locator("#header").get_by_text("tiny-turbo").wait_for(state="visible")
        _wait_for_few_step_defaults(page)
        page.locator("#t2i-prompt textarea").fill("a red circle")  # without the tag of a LoRA that is no LoRA
        page.locator("#t2i-generate").click()
        _wait_for_textarea_containing(page, "Model: tiny-turbo")

        page.reload()  # a page opened after the switch shows the model served, not the one at start
        page.locator("#header").get_by_text("tiny-turbo").wait_for(state="visible")
        _wait_for_few_step_defaults(page)
        assert page.locator("#model-picker input").input_value() == "tiny-turbo"
        _check_no_error_shown(page)


def _tiny_taesd(folder: Path) -> Path:
    """A tiny random TAESD in diffusers' AutoencoderTiny layout."""
    folder.mkdir()
    config = TAESDConfig.tiny()
    save_file(TinyAutoencoder(config).state_dict(), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_hub_config()))
    return folder


def _check_no_error_shown(page) -> None:
    """No "Error" badge on any component (Gradio shows one where an event failed), after the events settle."""
    page.wait_for_timeout(1500)
    assert page.get_by_text("Error", exact=True).count() == 0


def _wait_for_few_step_defaults(page) -> None:
    page.wait_for_function("() => document.querySelector('#t2i-steps input[type=number]').value === '1'")
    values = {name: page.locator(f"#t2i-{name} input").first.input_value()
              for name in ("sampler", "guidance-scale", "decoder")}
    assert values == {"sampler": "Euler a", "guidance-scale": "0", "decoder": "Tiny (TAESD)"}


def _show_the_inside(page) -> None:
    """Open "Inside the generation", ask for the three views of two images and check what appears beneath."""
    page.get_by_text("Inside the generation").click()
    for view in ("denoising", "guidance", "word-maps"):
        page.locator(f"#t2i-show-{view} input").check()
    _set_slider(page, "#t2i-num-images", 2)
    page.locator("#t2i-seed input").fill("3")  # a seed that draws it well
    page.locator("#t2i-generate").click()
    for elem_id in ("t2i-inside-denoising", "t2i-inside-guidance"):
        page.locator(f"#{elem_id} img").wait_for(state="visible")
    words = page.locator("#t2i-inside-words .thumbnail-item")
    words.nth(6).wait_for(state="visible")
    assert words.locator(".caption-label").all_inner_texts() == ["a", "red", "circle", "on", "a", "blue",
                                                                 "background"]
    assert page.locator("#t2i-inside-note").inner_text().startswith("Inside image 1 of 2 (seed 3)")
    for elem_id in ("t2i-inside-denoising", "t2i-inside-guidance", "t2i-inside-words"):
        _check_label_clear_of_content(page, elem_id)


def _choose_the_second_image(page) -> None:
    """Click the second result: the views beneath become its own."""
    strip = page.locator("#t2i-inside-denoising img").get_attribute("src")
    page.locator("#t2i-gallery .thumbnail-item").nth(1).click()
    page.wait_for_function("() => document.querySelector('#t2i-inside-note').innerText"
                           ".startsWith('Inside image 2 of 2 (seed 4)')")
    assert page.locator("#t2i-inside-denoising img").get_attribute("src") != strip


def _draw_one_step_paths(page) -> None:
    """Euler in one step on the sampler paths' plot: the view that shows why one-step models space "trailing"."""
    plot = page.locator("#paths-plot img")
    plot.wait_for(state="visible")
    _check_label_clear_of_content(page, "paths-plot")

    def redrawn(change) -> None:
        before = plot.get_attribute("src")
        change()
        page.wait_for_function("before => document.querySelector('#paths-plot img').src !== before", arg=before)

    redrawn(lambda: (page.locator("#paths-sampler input").click(),
                     page.get_by_role("option", name="Euler", exact=True).click()))
    redrawn(lambda: _set_slider(page, "#paths-steps", 1))


def _png_info_sends_to_text_to_image(page, folder: Path) -> Path:
    """Open the web UI example in the PNG info tab, screenshot it, send it, and check text to image's fields."""
    page.get_by_role("tab", name="PNG info").click()
    page.locator("#png-examples img").first.click()  # the AUTOMATIC1111-style example: its chunk survives the upload
    _wait_for_textarea_containing(page, "Schedule type: Karras")
    page.locator("#png-settings").get_by_text("dpmpp_2m_karras").wait_for(state="visible")
    shot = _screenshot(page, folder)
    page.locator("#png-send").click()
    page.locator("#t2i-prompt textarea").wait_for(state="visible")  # back on text to image
    assert page.get_by_role("tab", selected=True).inner_text().strip() == "Text to image"
    with Image.open(WEB_UI_EXAMPLE) as example:
        expected = example.info["parameters"]
    assert expected.startswith("a red circle on a blue background\nNegative prompt: a green background\n")
    page.wait_for_function("() => document.querySelector('#t2i-steps input[type=number]').value === '24'")
    fields = {
        "prompt": page.locator("#t2i-prompt textarea").input_value(),
        "negative": page.locator("#t2i-negative-prompt textarea").input_value(),
        "sampler": page.locator("#t2i-sampler input").input_value(),
        **{name: page.locator(f"#t2i-{name} input[type=number]").input_value()
           for name in ("steps", "guidance-scale", "width", "height")},
        "seed": page.locator("#t2i-seed input").input_value(),
    }
    assert fields == {"prompt": "a red circle on a blue background", "negative": "a green background",
                      "sampler": "DPM++ 2M Karras", "steps": "24", "guidance-scale": "6.5", "width": "512",
                      "height": "512", "seed": "1234"}
    return shot


def _check_controls_layout(page, prefix: str, extra: tuple[str, ...] = ()) -> None:
    """Each setting's label on one line (``extra``: settings shown only with some models or flags); the
    sampler's name whole, clear of the dropdown's arrow."""
    for name in ("prompt", "negative-prompt", "sampler", "steps", "guidance-scale", "num-images", "width", "height",
                 "seed", *extra):
        lines = page.evaluate(
            """id => { const range = document.createRange();
                       range.selectNodeContents(document.querySelector(`#${id} [data-testid=block-info]`));
                       return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size; }""",
            f"{prefix}-{name}")
        assert lines == 1, f"{prefix}-{name}: its label wraps onto {lines} lines"
    sampler = page.evaluate(
        """id => { const input = document.querySelector(`#${id} input`);
                   const style = getComputedStyle(input);
                   const context = document.createElement('canvas').getContext('2d');
                   context.font = style.font;
                   return {text: input.value, scroll: input.scrollWidth, client: input.clientWidth,
                           textRight: input.getBoundingClientRect().left + parseFloat(style.paddingLeft)
                                      + context.measureText(input.value).width,
                           arrowLeft: document.querySelector(`#${id} .icon-wrap`).getBoundingClientRect().left}; }""",
        f"{prefix}-sampler")
    assert sampler["text"] == "DPM++ 2M Karras"
    assert sampler["scroll"] <= sampler["client"], f"the sampler's name is clipped: {sampler}"
    assert sampler["textRight"] <= sampler["arrowLeft"], f"the dropdown's arrow covers the sampler's name: {sampler}"


def _check_numbers_shown_whole(page) -> None:
    """Every slider's number box on the open tab shows its whole value."""
    clipped = page.evaluate(
        """() => [...document.querySelectorAll('input[data-testid=number-input]')]
                     .filter(box => box.offsetParent && box.scrollWidth > box.clientWidth)
                     .map(box => `${box.getAttribute('aria-label')}: ${box.value}`)""")
    assert not clipped, f"number boxes too narrow for their values: {clipped}"


def _check_label_clear_of_content(page, elem_id: str) -> None:
    """The label badge of a plot, image or gallery covers none of its pictures."""
    overlaps = page.evaluate(
        """id => { const block = document.getElementById(id);
                   const label = block.querySelector('[data-testid=block-label]').getBoundingClientRect();
                   return [...block.querySelectorAll('img')].map(img => img.getBoundingClientRect())
                       .filter(r => r.width && r.left < label.right && label.left < r.right
                                    && r.top < label.bottom && label.top < r.bottom).length; }""",
        elem_id)
    assert overlaps == 0, f"#{elem_id}: its label covers {overlaps} of its pictures"


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _wait_for_textarea_containing(page, text: str) -> None:
    page.wait_for_function(
        "text => [...document.querySelectorAll('textarea')].some(t => t.value.includes(text))", arg=text,
        timeout=TIMEOUT_MS,
    )


def _element_screenshot(page, elem_id: str, path: Path) -> Path:
    """A screenshot of one part of the page, with no focus ring or hover on it."""
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.mouse.move(0, 0)
    page.wait_for_timeout(1500)  # as _screenshot
    page.locator(f"#{elem_id}").screenshot(path=str(path))
    return path


def _screenshot(page, folder: Path) -> Path:
    # Let images and plots finish painting after their elements appear (Gradio keeps a stream
    # open, so the network never goes idle to wait for).
    page.wait_for_timeout(1500)
    name = page.get_by_role("tab", selected=True).inner_text().strip().lower().replace(" ", "-")
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
