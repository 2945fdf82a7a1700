"""The inside views in the app (#16), through ``gradio_client`` on the real ``app.py`` serving the bundled model.

A generation endpoint records its inside when asked (``show_denoising``, ``show_guidance``,
``show_word_maps``, ``steps_shown``: its last parameters, off by default); ``/<endpoint>_inside``
then returns the views of the session's last run: a note, the denoising strip, the guidance strip
and the word-map overlays captioned with their words. The bundled model (32 px, trained) draws the
shape the prompt names, so the strips show a real denoising.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_app import REPO, gallery_images, pixels, serve_app

from stable_diffusion.inside import GuidanceMap, Snapshot
from stable_diffusion.inside_pictures import MIN_CELL_SIDE, guidance_strip, trajectory_strip

MODEL = REPO / "models" / "tiny-shapes"
SQUARE = REPO / "examples" / "images" / "square.png"
SQUARE_MASK = REPO / "examples" / "images" / "square-mask.png"
PROMPT = "a red circle on a blue background"
WORDS = ["a", "red", "circle", "on", "a", "blue", "background"]
SIDE = 32  # the bundled model's native size
VIEWS = (True, True, True)  # show_denoising, show_guidance, show_word_maps


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    with serve_app("--model", str(MODEL), "--device", "cpu", "--dtype", "float32", log=log) as url:
        yield url


@pytest.fixture()
def client(app_url: str, tmp_path: Path) -> Client:
    return Client(app_url, verbose=False, download_files=str(tmp_path))


def text_to_image(client: Client, *, seed: int, guidance_scale: float = 4.0, num_images: int = 1,
                  views: tuple[bool, bool, bool] | None = None, steps_shown: int = 6) -> tuple[list[dict], str]:
    args = [PROMPT, "", "euler", 10, guidance_scale, SIDE, SIDE, seed, num_images]
    if views is not None:  # the new parameters come last: without them, the call of any older client
        args += ["full", *views, steps_shown]
    gallery, _preview, parameters = client.predict(*args, api_name="/text_to_image")
    return gallery, parameters


def opened(path: str | None) -> Image.Image | None:
    if path is None:
        return None
    with Image.open(path) as image:
        return image.convert("RGB")


def strip_size(columns: int) -> tuple[int, int]:
    """The size of a denoising strip of ``columns`` steps of the bundled model's images, as the library draws it."""
    picture = Image.new("RGB", (SIDE, SIDE))
    return trajectory_strip([Snapshot(0, 1.0, 999.0, picture, picture)] * columns).size


def guidance_size(columns: int) -> tuple[int, int]:
    shown = Image.new("RGB", (MIN_CELL_SIDE, MIN_CELL_SIDE))  # the page enlarges a small image first
    return guidance_strip(shown, [GuidanceMap(0, 1.0, 999.0, np.ones((SIDE, SIDE), np.float32))] * columns).size


def last_prediction(strip: Image.Image) -> np.ndarray:
    """The strip's bottom-right cell, x̂0 at the last step, back at the image's size (cells are enlarged pixels)."""
    cell = pixels(strip)[-MIN_CELL_SIDE:, -MIN_CELL_SIDE:]
    factor = MIN_CELL_SIDE // SIDE
    return cell[::factor, ::factor]


def test_text_to_image_views_of_each_image_of_the_batch(client: Client) -> None:
    gallery, parameters = text_to_image(client, seed=5, num_images=2, views=VIEWS)
    images = gallery_images(gallery)
    assert "Seed: 5" in parameters and "Seed: 6" in parameters

    note, denoising, guidance, words = client.predict(api_name="/text_to_image_inside")
    assert note.startswith("**Inside image 1 of 2** (seed 5)")
    strip = opened(denoising)
    assert strip.size == strip_size(6)
    # Euler's last step goes to σ = 0, where x equals the last x̂0: the strip's last prediction is
    # the finished image (decoded by the same VAE, as previews of a small VAE are; up to rounding).
    assert np.abs(last_prediction(strip) - pixels(images[0])).max() <= 2
    heat = opened(guidance)
    assert heat.size == guidance_size(6) and pixels(heat).std() > 10
    assert [item["caption"] for item in words] == WORDS
    overlays = [opened(item["image"]) for item in words]
    assert {overlay.size for overlay in overlays} == {(256, 256)}
    # Each word has its own map: not all the same picture.
    assert len({overlay.tobytes() for overlay in overlays}) > 3

    note, denoising, _, words = client.predict(2, api_name="/text_to_image_inside")
    assert note.startswith("**Inside image 2 of 2** (seed 6)")
    assert np.abs(last_prediction(opened(denoising)) - pixels(images[1])).max() <= 2
    assert [item["caption"] for item in words] == WORDS
    with pytest.raises(AppError, match=r"Image of the batch must be from 1 to 2 \(the last run made 2\), got 3"):
        client.predict(3, api_name="/text_to_image_inside")


def test_views_change_no_pixel_and_a_plain_run_records_nothing(client: Client) -> None:
    watched, watched_parameters = text_to_image(client, seed=21, views=VIEWS)
    plain, plain_parameters = text_to_image(client, seed=21)  # an older client's call: no view parameters
    np.testing.assert_array_equal(pixels(gallery_images(plain)[0]), pixels(gallery_images(watched)[0]))
    assert plain_parameters == watched_parameters
    note, denoising, guidance, words = client.predict(api_name="/text_to_image_inside")
    assert note.startswith("The last run asked for no view of its inside")
    assert (denoising, guidance, words) == (None, None, [])


def test_no_guidance_maps_without_guidance_and_a_note_says_why(client: Client) -> None:
    text_to_image(client, seed=3, guidance_scale=1.0, views=(True, True, False), steps_shown=3)
    note, denoising, guidance, words = client.predict(api_name="/text_to_image_inside")
    assert opened(denoising).size == strip_size(3)
    assert guidance is None and words == []
    assert "nothing to map at guidance scale 1" in note and "set the guidance scale above 1" in note


def test_image_to_image_views_count_the_steps_it_runs(client: Client) -> None:
    prompt = "a purple square on a yellow background"
    # Strength 0.8 of 10 steps runs 8: asking for 12 shows all 8.
    _gallery, _preview, parameters = client.predict(
        handle_file(str(SQUARE)), 0.8, prompt, "", "euler", 10, 4.0, SIDE, SIDE, 7, 1, "full", *VIEWS, 12,
        api_name="/image_to_image")
    assert "Denoising strength: 0.8" in parameters
    note, denoising, guidance, words = client.predict(api_name="/image_to_image_inside")
    assert note.startswith("**Inside image 1 of 1** (seed 7)")
    assert opened(denoising).size == strip_size(8)
    assert opened(guidance).size == guidance_size(8)
    assert [item["caption"] for item in words] == ["a", "purple", "square", "on", "a", "yellow", "background"]


def test_inpainting_passes_the_options_through(client: Client) -> None:
    editor = {"background": handle_file(str(SQUARE)), "layers": [handle_file(str(SQUARE_MASK))], "composite": None}
    client.predict(editor, 1.0, 4, 0, 0, 0, 0, "a green triangle on a white background", "", "euler", 6, 4.0, 0, 0,
                   1, 1, "full", False, False, True, 6, api_name="/inpaint")
    note, denoising, guidance, words = client.predict(api_name="/inpaint_inside")
    assert (denoising, guidance) == (None, None)
    assert [item["caption"] for item in words] == ["a", "green", "triangle", "on", "a", "white", "background"]


def test_sampler_paths_plot(client: Client) -> None:
    plot = client.predict("euler", 1, api_name="/sampler_paths")
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    assert client.predict("dpmpp_2m_karras", 20, api_name="/sampler_paths")["plot"] != plot["plot"]
    with pytest.raises(AppError, match="Sampler must be one of ddpm, ddim, euler"):
        client.predict("plms", 4, api_name="/sampler_paths")
    with pytest.raises(AppError, match="Steps N must be a number from 1 to 50, got 51"):
        client.predict("euler", 51, api_name="/sampler_paths")
