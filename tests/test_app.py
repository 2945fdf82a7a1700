"""End-to-end tests of the Gradio app: the real ``app.py`` in a subprocess, called through its API.

A tiny random model (our networks at their ``tiny()`` configs, the real SD 1.5 tokenizer) is saved
in the Hub layout once per session and served on a free localhost port. Every tab's endpoint is
called through ``gradio_client`` as a remote user would: image sizes, non-blank pixels, seeds that
reproduce, the PNG parameters chunk, concurrent users and bad inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from transformers import CLIPTokenizer

from conftest import assert_same_picture
from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.hub import load, save
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.schedules import SchedulerConfig
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import AutoencoderKL, VAEConfig

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
TOKENIZER = REPO / "tests" / "fixtures" / "hub-layouts" / "stable-diffusion-v1-5" / "tokenizer"
EXAMPLE_IMAGE = REPO / "examples" / "images" / "house.png"
WEB_UI_EXAMPLE = REPO / "examples" / "images" / "web-ui-parameters.png"
GENERIC_ERROR = "The upstream Gradio app has raised an exception"
STARTUP_TIMEOUT_S = 180

# Small and quick on two CPU cores; every request below uses these unless it tests something else.
FAST = dict(negative_prompt="", sampler="euler", steps=3, guidance_scale=7.5, width=64, height=64, num_images=1)


# ------------------------------------------------------------------------------------ helpers
def make_tiny_model(folder: Path) -> Path:
    """Save a tiny random pipeline (fixed seed) in the Hub layout with ``stable_diffusion.hub.save``."""
    torch.manual_seed(0)
    pipe = StableDiffusion(
        text_encoder=CLIPTextModel(CLIPTextConfig.tiny()).eval(),
        unet=UNet(UNetConfig.tiny()).eval(),
        vae=AutoencoderKL(VAEConfig.tiny()).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        scheduler=SchedulerConfig(),
        name="tiny-random",
    )
    save(pipe, folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(*args: str, log: Path, threads: int | None = 1) -> Iterator[str]:
    """Run ``python app.py ARGS`` on a free 127.0.0.1 port; yield its URL once it answers.

    ``threads``: torch's CPU threads in the app (one: the same sums as a test's own single-threaded
    pipeline; None: torch's default, all the cores).
    """
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("SD_MODEL", None)
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(url, timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"app.py did not answer within {STARTUP_TIMEOUT_S}s:\n{log.read_text()}")
                    time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def page_text(url: str) -> str:
    """Every Markdown value on the page, from the app's config."""
    with urllib.request.urlopen(url + "config", timeout=10) as response:
        config = json.load(response)
    return "\n".join(str(c["props"].get("value", "")) for c in config["components"] if c["type"] == "markdown")


def gallery_images(gallery: list[dict]) -> list[Image.Image]:
    images = []
    for item in gallery:
        image = Image.open(item["image"])
        image.load()
        images.append(image)
    return images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_not_blank(image: Image.Image) -> None:
    array = pixels(image)
    assert array.std() > 2.0, f"the image is (almost) one flat colour: std {array.std():.2f}"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def app_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("app-log") / "app.log"


@pytest.fixture(scope="module")
def app_url(tiny_model: Path, app_log: Path) -> Iterator[str]:
    with serve_app("--model", str(tiny_model), "--device", "cpu", "--dtype", "float32", log=app_log) as url:
        yield url


@pytest.fixture()
def client(app_url: str, tmp_path: Path) -> Client:
    return Client(app_url, verbose=False, download_files=str(tmp_path))


def text_to_image(client: Client, prompt: str, *, seed: int, **options) -> tuple[list[dict], str]:
    settings = {**FAST, **options}
    gallery, _preview, parameters = client.predict(
        prompt, settings["negative_prompt"], settings["sampler"], settings["steps"], settings["guidance_scale"],
        settings["width"], settings["height"], seed, settings["num_images"], api_name="/text_to_image",
    )
    return gallery, parameters


# ------------------------------------------------------------------------------------ tests
def test_page_header_names_model_device_and_precision(app_url: str, tiny_model: Path) -> None:
    text = page_text(app_url)
    # A local model goes by its folder name, not the absolute path of this machine.
    assert f"Model {tiny_model.name} on" in text or f"Model **{tiny_model.name}**" in text
    assert str(tiny_model.parent) not in text
    assert "cpu" in text and "float32" in text


def test_on_a_cpu_the_app_warms_up_before_its_first_request(client: Client, app_log: Path) -> None:
    # One 1-step image of its own, in the model's queue, started before any visitor's job.
    wait_for(lambda: "Warmed up: a 64x64 image of" in app_log.read_text(), "the warm-up image")
    jobs = [line for line in app_log.read_text().splitlines() if "Job started" in line]
    assert jobs[0].endswith("Job started: txt2img via warm-up")


def test_text_to_image_sizes_seeds_and_png_parameters(client: Client) -> None:
    gallery, parameters = text_to_image(client, "a red circle on a blue background", seed=1234, num_images=2,
                                        width=80, height=64)
    images = gallery_images(gallery)
    assert [image.size for image in images] == [(80, 64), (80, 64)]
    for image in images:
        assert_not_blank(image)
    assert [item["caption"] for item in gallery] == ["seed 1234", "seed 1235"]
    # The downloaded file is the PNG the app wrote, with the generation parameters chunk.
    chunk = images[0].info["parameters"]
    assert chunk.startswith("a red circle on a blue background\n")
    assert "Seed: 1234" in chunk and "Size: 80x64" in chunk and "Steps: 3" in chunk
    assert "Seed: 1235" in images[1].info["parameters"]
    assert "Seed: 1234" in parameters and "Seed: 1235" in parameters

    # Image 2 of the batch alone: the same noise, run through single-image kernels.
    again, _ = text_to_image(client, "a red circle on a blue background", seed=1235, width=80, height=64)
    assert_same_picture(pixels(gallery_images(again)[0]), pixels(images[1]))


def test_text_to_image_matches_the_pipeline_called_directly(client: Client, tiny_model: Path) -> None:
    options = dict(negative_prompt="a green square", sampler="dpmpp_2m_karras", steps=4, guidance_scale=5.0,
                   width=64, height=72, num_images=1)
    gallery, _ = text_to_image(client, "a red circle on a blue background", seed=99, **options)
    pipe = load(tiny_model, device="cpu", dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1), so float sums round the same
    try:
        expected = pipe.text_to_image("a red circle on a blue background", seed=99, **options).images[0]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(pixels(gallery_images(gallery)[0]), pixels(expected))


def test_empty_prompt_is_an_unconditional_sample(client: Client) -> None:
    gallery, parameters = text_to_image(client, "", seed=8)
    assert gallery_images(gallery)[0].size == (64, 64)
    assert parameters.startswith("\nSteps: 3")


def test_random_seed_is_reported(client: Client) -> None:
    gallery, parameters = text_to_image(client, "a green square", seed=-1)
    seed = int(gallery[0]["caption"].removeprefix("seed "))
    assert f"Seed: {seed}" in parameters
    again, _ = text_to_image(client, "a green square", seed=seed)
    np.testing.assert_array_equal(pixels(gallery_images(again)[0]), pixels(gallery_images(gallery)[0]))


def test_live_previews_then_stop(client: Client, app_log: Path) -> None:
    job = client.submit("a red circle", "", "euler", 6, 7.5, 64, 64, 3, 1, api_name="/text_to_image")
    final_gallery, _, _ = job.result(timeout=60)
    previews = [output for output in job.outputs()[:-1] if isinstance(output[1], str)]
    assert previews, "no live preview was streamed"
    for _gallery, preview, _status in previews:
        # The 64 px preview, scaled up 4x without smoothing: every 4x4 block is one pixel.
        shown = pixels(Image.open(preview))
        assert shown.shape == (256, 256, 3)
        np.testing.assert_array_equal(shown, np.repeat(np.repeat(shown[::4, ::4], 4, axis=0), 4, axis=1))
    *steps, (_gallery, last_preview, last_status) = previews
    assert steps and all(status.startswith("Step ") and status.endswith(" of 6") for _g, _p, status in steps)
    # The last step's preview would be the image decoded a second time: the image itself is shown
    # in the preview pane instead, before the gallery's files are written (the 64 px image, 4x).
    assert "Step 6 of 6" not in [status for _gallery, _preview, status in steps]
    assert last_status == "Finished: saving the PNG files"
    np.testing.assert_array_equal(pixels(Image.open(last_preview))[::4, ::4], pixels(gallery_images(final_gallery)[0]))
    assert final_gallery[0]["caption"] == "seed 3"

    # A long request, stopped after its first preview: the server says so and serves the next one.
    job = client.submit("a red circle", "", "euler", 100, 7.5, 256, 256, 3, 4, api_name="/text_to_image")
    wait_for(lambda: job.outputs(), "a first preview")
    job.cancel()
    wait_for(lambda: "Generation stopped" in app_log.read_text(), "the server to stop the generation")
    gallery, _ = text_to_image(client, "a red circle", seed=1)
    assert gallery_images(gallery)[0].size == (64, 64)


def test_image_to_image(client: Client) -> None:
    def redraw(seed: int, width: int, height: int) -> list[dict]:
        gallery, _preview, parameters = client.predict(
            handle_file(str(EXAMPLE_IMAGE)), 0.6, "a house on a hill", "", "euler", 4, 5.0, width, height, seed, 1,
            api_name="/image_to_image",
        )
        assert "Denoising strength: 0.6" in parameters
        return gallery

    first = gallery_images(redraw(7, 64, 64))[0]
    assert first.size == (64, 64)
    assert_not_blank(first)
    np.testing.assert_array_equal(pixels(gallery_images(redraw(7, 64, 64))[0]), pixels(first))
    assert not np.array_equal(pixels(gallery_images(redraw(8, 64, 64))[0]), pixels(first))
    assert gallery_images(redraw(7, 80, 48))[0].size == (80, 48)
    # 0 x 0: the input's shape (square here) at the model's native size.
    assert gallery_images(redraw(7, 0, 0))[0].size == (64, 64)


def test_noise_schedule_tab(client: Client) -> None:
    plot = client.predict(["linear", "scaled_linear", "cosine"], True, 1000, api_name="/schedule_plot")
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")

    args = (handle_file(str(EXAMPLE_IMAGE)), "scaled_linear", False, 1000, "0, 500, 999", 0)
    strip = client.predict(*args, api_name="/noise_pixels")
    assert [item["caption"].split(",")[0] for item in strip] == ["t = 0", "t = 500", "t = 999"]
    clean, half, last = (pixels(image) for image in gallery_images(strip))
    assert clean.shape == (256, 256, 3)
    source = pixels(Image.open(EXAMPLE_IMAGE).resize((256, 256), Image.LANCZOS))
    # x_t drifts away from x_0 as t grows: ᾱ goes from ~1 to ~0.
    errors = [np.abs(image - source).mean() for image in (clean, half, last)]
    assert errors[0] < 10 < errors[1] < errors[2]

    latent_strip = client.predict(*args, api_name="/noise_latents")
    latent_images = gallery_images(latent_strip)
    assert len(latent_images) == 3 and latent_images[0].size == (256, 256)


def test_two_clients_at_once_get_their_own_results(app_url: str, tmp_path: Path) -> None:
    prompts = {11: "a red circle on a blue background", 22: "a yellow triangle on a green background"}
    alone = {}
    for seed, prompt in prompts.items():
        client = Client(app_url, verbose=False, download_files=str(tmp_path / f"alone-{seed}"))
        alone[seed] = pixels(gallery_images(text_to_image(client, prompt, seed=seed)[0])[0])

    def run(seed: int) -> np.ndarray:
        client = Client(app_url, verbose=False, download_files=str(tmp_path / f"together-{seed}"))
        return pixels(gallery_images(text_to_image(client, prompts[seed], seed=seed)[0])[0])

    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(prompts, pool.map(run, prompts), strict=True))
    assert not np.array_equal(alone[11], alone[22])
    for seed in prompts:
        np.testing.assert_array_equal(together[seed], alone[seed])


def hostile_files(folder: Path) -> dict[str, Path]:
    """Uploads that are not usable images, each the kind a real user or a script sends by mistake."""
    files = {"text": folder / "notes.txt", "empty": folder / "empty.png", "truncated": folder / "truncated.png",
             "bomb": folder / "bomb.png"}
    files["text"].write_text("not a picture\n")
    files["empty"].write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:3000])
    # A PNG header claiming 8000 x 8000 pixels (64 megapixels: over the app's 50, under PIL's own
    # limit of 89, so this tests the app's policy) with almost no data behind it.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)
    files["bomb"].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                              + chunk(b"IEND", b""))
    return files


def t2i_args(prompt: object = "a red circle", **options: object) -> list[object]:
    settings = {**FAST, "seed": 1, **options}
    return [prompt, *(settings[name] for name in ("negative_prompt", "sampler", "steps", "guidance_scale", "width",
                                                  "height", "seed", "num_images"))]


def i2i_args(image: object, **options: object) -> list[object]:
    settings = {**FAST, "seed": 1, "strength": 0.6, **options}
    return [image, settings["strength"], *t2i_args(**{k: v for k, v in settings.items() if k != "strength"})]


def noise_args(image: object = None, **options: object) -> list[object]:
    settings = {"schedule": "scaled_linear", "zero_snr": False, "num_train_timesteps": 1000, "timesteps": "0, 500",
                "seed": 0, **options}
    return [handle_file(str(image or EXAMPLE_IMAGE)), *settings.values()]


def hostile_requests(files: dict[str, Path]) -> list[tuple[str, list[object], str]]:
    """(endpoint, arguments, the message it must answer with): wrong types, ranges, choices and files."""
    long_prompt = "a red circle, " * 20_000  # 280,000 characters
    return [
        ("/text_to_image", t2i_args(steps="abc"), "Steps must be a number from 1 to 100, got 'abc'"),
        ("/text_to_image", t2i_args(guidance_scale="7.5"), "Guidance scale (CFG) must be a number from 0 to 20, got '7.5'"),
        ("/text_to_image", t2i_args(width=None), "Width must be a number from 64 to 1024, got None"),
        ("/text_to_image", t2i_args(seed="random"), "Seed (-1: random) must be a number of at least -1, got 'random'"),
        ("/text_to_image", t2i_args(num_images=True), "Number of images must be a number from 1 to 4, got True"),
        ("/text_to_image", t2i_args(steps=500), "Steps must be a number from 1 to 100, got 500"),
        ("/text_to_image", t2i_args(num_images=9), "Number of images must be a number from 1 to 4, got 9"),
        ("/text_to_image", t2i_args(guidance_scale=-1.0), "Guidance scale (CFG) must be a number from 0 to 20, got -1.0"),
        ("/text_to_image", t2i_args(sampler="plms"), "Sampler must be one of ddpm, ddim, euler"),
        ("/text_to_image", t2i_args(sampler=["euler"]), "Sampler must be one of ddpm"),
        ("/text_to_image", t2i_args(width=68), "Width must be a multiple of 8, got 68: try 64 or 72"),
        ("/text_to_image", t2i_args(width=2048, height=2048), "Width must be a number from 64 to 1024, got 2048"),
        ("/text_to_image", t2i_args(seed=-5), "Seed (-1: random) must be a number of at least -1, got -5"),
        ("/text_to_image", t2i_args(seed=2**63), "Seed must be a whole number from 0 to"),
        ("/text_to_image", t2i_args(None), "The prompt must be text"),
        ("/text_to_image", t2i_args(long_prompt), "The prompt is too long"),
        ("/text_to_image", t2i_args(negative_prompt=long_prompt), "The negative prompt is too long"),
        ("/image_to_image", i2i_args(handle_file(str(files["text"]))),
         "Input image: notes.txt is not an image file this server can read"),
        ("/image_to_image", i2i_args(handle_file(str(files["empty"]))), "Input image: empty.png is empty (0 bytes)"),
        ("/image_to_image", i2i_args(handle_file(str(files["truncated"]))),
         "Input image: truncated.png is damaged or cut short"),
        ("/image_to_image", i2i_args(handle_file(str(files["bomb"]))),
         "Input image: bomb.png has more than 50 megapixels, the most this server opens"),
        ("/image_to_image", i2i_args(None), "No input image: upload or paste an image"),
        ("/image_to_image", i2i_args(handle_file(str(EXAMPLE_IMAGE)), strength=0.0),
         "Strength must be a number from 0.05 to 1, got 0.0"),
        ("/noise_pixels", noise_args(files["bomb"]), "Image to noise: bomb.png has more than 50 megapixels"),
        ("/noise_pixels", noise_args(files["text"]), "Image to noise: notes.txt is not an image file"),
        ("/noise_pixels", noise_args(schedule="quadratic"),
         "Schedule for the images must be one of linear, scaled_linear, cosine"),
        ("/noise_pixels", noise_args(num_train_timesteps="abc"), "Training steps T must be a number from 10 to 4000"),
        ("/noise_pixels", noise_args(timesteps="0, 1000"), "Timesteps must be from 0 to T−1 = 999; got [1000]"),
        ("/noise_pixels", noise_args(timesteps="zero"), "Timesteps must be whole numbers separated by commas"),
        ("/schedule_plot", ["linear", False, 1000], "Schedules to compare must be a list of some of linear"),
        ("/schedule_plot", [[], False, 1000], "Pick at least one schedule"),
        ("/png_info", [handle_file(str(files["truncated"]))],
         "Image with parameters: truncated.png is damaged or cut short"),
        # The inside views: the options after the decoder, their endpoints, the sampler paths.
        ("/text_to_image", [*t2i_args(), "full", "yes", False, False, 6],
         "Show the denoising must be true or false, got 'yes'"),
        ("/text_to_image", [*t2i_args(), "full", False, 1, False, 6], "Where guidance pushes must be true or false, got 1"),
        ("/text_to_image", [*t2i_args(), "full", True, False, False, 0], "Steps shown (N) must be a number from 1 to 12, got 0"),
        ("/image_to_image", [*i2i_args(handle_file(str(EXAMPLE_IMAGE))), "full", False, False, None, 6],
         "Word maps must be true or false, got None"),
        ("/text_to_image_inside", [0], "Image of the batch must be a number of at least 1, got 0"),
        ("/schedule_plot", [["linear"], "no", 1000], "Zero terminal SNR must be true or false, got 'no'"),
        ("/sampler_paths", ["plms", 4], "Sampler must be one of ddpm, ddim, euler"),
        ("/sampler_paths", ["euler", 0], "Steps N must be a number from 1 to 50, got 0"),
    ]


def test_hostile_requests_get_specific_messages_and_the_server_lives_on(client: Client, app_log: Path,
                                                                         tmp_path: Path) -> None:
    log_start = len(app_log.read_text())
    requests = hostile_requests(hostile_files(tmp_path))
    assert len(requests) >= 20
    for endpoint, args, message in requests:
        with pytest.raises(AppError) as error:
            client.predict(*args, api_name=endpoint)
        assert message in str(error.value), f"{endpoint} {str(args)[:120]}: {error.value}"
        assert GENERIC_ERROR not in str(error.value)
    # The user's mistakes are not the server's: no traceback in its log.
    assert "Traceback" not in app_log.read_text()[log_start:]
    gallery, _ = text_to_image(client, "a red circle", seed=1)
    assert gallery_images(gallery)[0].size == (64, 64)


def test_non_finite_numbers_over_raw_http(app_url: str) -> None:
    """JSON clients other than gradio_client can send NaN and Infinity, which pass every bounds check."""
    def call(arguments: str) -> str:
        request = urllib.request.Request(app_url + "gradio_api/call/text_to_image",
                                         data=f'{{"data": [{arguments}]}}'.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            event_id = json.load(response)["event_id"]
        with urllib.request.urlopen(f"{app_url}gradio_api/call/text_to_image/{event_id}", timeout=60) as response:
            return response.read().decode()

    # Raw HTTP gives every argument: the decoder, then the inside views' options last.
    assert "Steps must be a number from 1 to 100, got nan" in call(
        '"a red circle", "", "euler", NaN, 7.5, 64, 64, 1, 1, "full", false, false, false, 6')
    assert "Guidance scale (CFG) must be a number from 0 to 20, got inf" in call(
        '"a red circle", "", "euler", 3, Infinity, 64, 64, 1, 1, "full", false, false, false, 6')
    assert "Steps shown (N) must be a number from 1 to 12, got nan" in call(
        '"a red circle", "", "euler", 3, 7.5, 64, 64, 1, 1, "full", true, false, false, NaN')


def test_every_setting_with_a_natural_default_has_one_in_the_api(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")
    required = {name: [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
                for name, endpoint in api["named_endpoints"].items()}
    assert required == {"/text_to_image": [], "/image_to_image": ["image"], "/schedule_plot": [],
                        "/noise_pixels": [], "/noise_latents": [], "/png_info": ["image"],
                        "/parse_parameters": ["text"], "/inpaint": ["editor"], "/load_model": [],
                        "/text_to_image_inside": [], "/image_to_image_inside": [], "/inpaint_inside": [],
                        "/sampler_paths": []}
    # The inside views are off unless asked for, and their endpoints return what gradio_client
    # returned before they existed: the gallery, the preview and the parameters.
    defaults = {p["parameter_name"]: p["parameter_default"]
                for p in api["named_endpoints"]["/text_to_image"]["parameters"][-4:]}
    assert defaults == {"show_denoising": False, "show_guidance": False, "show_word_maps": False, "steps_shown": 6}
    assert len(api["named_endpoints"]["/text_to_image"]["returns"]) == 3
    gallery, _preview, parameters = client.predict("a red circle", api_name="/text_to_image")
    assert gallery_images(gallery)[0].size == (64, 64)
    assert "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5" in parameters


def test_png_info_reads_ours_and_the_web_uis(client: Client) -> None:
    gallery, parameters = text_to_image(client, "a red circle", seed=5, negative_prompt="a blue square",
                                        sampler="euler_a", steps=4, guidance_scale=6.0, width=72, height=64)
    text, settings, note = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert text == parameters and note == ""
    assert settings == {"prompt": "a red circle", "negative_prompt": "a blue square", "sampler": "euler_a",
                        "steps": 4, "guidance_scale": 6.0, "seed": 5, "width": 72, "height": 64}

    # The AUTOMATIC1111 web UI's PNG (v1.10 writes the Karras schedule apart from the sampler).
    text, settings, _ = client.predict(handle_file(str(WEB_UI_EXAMPLE)), api_name="/png_info")
    assert text.startswith("a red circle on a blue background\nNegative prompt: a green background\nSteps: 24")
    assert settings == {"prompt": "a red circle on a blue background", "negative_prompt": "a green background",
                        "sampler": "dpmpp_2m_karras", "steps": 24, "guidance_scale": 6.5, "seed": 1234,
                        "width": 512, "height": 512}
    pasted = ('a cat, (detailed:1.2)\nNegative prompt: dog\nSteps: 30, Sampler: Euler a, CFG scale: 5, Seed: 7, '
              'Size: 512x768, Clip skip: 2, Lora hashes: "a: 1, b: 2", Version: f2.0.1')
    assert client.predict(pasted, api_name="/parse_parameters") == {
        "prompt": "a cat, (detailed:1.2)", "negative_prompt": "dog", "sampler": "euler_a", "steps": 30,
        "guidance_scale": 5.0, "seed": 7, "width": 512, "height": 768, "clip_skip": 2}

    text, settings, note = client.predict(handle_file(str(EXAMPLE_IMAGE)), api_name="/png_info")
    assert (text, settings) == ("", {}) and note.startswith("No generation parameters in this image")


def test_starts_without_the_model_and_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with serve_app("--model", str(missing), "--device", "cpu", "--dtype", "float32", log=tmp_path / "app.log") as url:
        assert "Could not load" in page_text(url)
        client = Client(url, verbose=False, download_files=str(tmp_path))
        strip = client.predict(handle_file(str(EXAMPLE_IMAGE)), "cosine", True, 1000, "0, 999", 0,
                               api_name="/noise_pixels")
        assert len(strip) == 2
        if not (REPO / "models" / "tiny-shapes").is_dir():
            with pytest.raises(AppError, match="No model is loaded"):
                text_to_image(client, "a red circle", seed=1)


def test_bad_flag_exits_with_a_message() -> None:
    result = subprocess.run([sys.executable, str(APP), "--auth", "alice"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "--auth must be USER:PASSWORD" in result.stderr


@pytest.mark.parametrize(("device", "message"), [("cuda:99", "cuda"), ("tpu", "Unknown device 'tpu'")])
def test_unusable_device_is_one_line_not_a_traceback(device: str, message: str) -> None:
    # cuda:99: no CUDA on this machine, or no 100th GPU on one with CUDA; one line either way.
    result = subprocess.run([sys.executable, str(APP), "--device", device], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # One line and nothing else: the flag was understood, this machine lacks the device.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.py: error:"), result.stderr
    assert message.lower() in lines[0].lower()


def test_send_to_text_to_image_keeps_values_the_page_can_take() -> None:
    import gradio as gr

    from stable_diffusion.request import parse_parameters_text
    from webui.generation import Controls
    from webui.png_info import _updates
    from webui.served import ServedModel

    with gr.Blocks():  # no model: native 512 x 512, the pixel budget caps each side at 512
        controls = Controls(ServedModel(None), prefix="t2i", auto_size=False, placeholder="")
    fields = parse_parameters_text("a cat\nSteps: 150, Sampler: Heun, CFG scale: 25, Seed: 3, Size: 1024x500, "
                                   "Clip skip: 2")
    updates, notes = _updates(fields, controls)
    assert {component.label: value for component, value in updates.items()} == {
        "Prompt": "a cat", "Negative prompt": "", "Steps": 100, "Guidance scale (CFG)": 20, "Width": 512,
        "Height": 496, "Seed (-1: random)": 3}
    assert notes == [
        "Sampler 'Heun' is not one this app has: the sampler was left as it was.",
        "Steps 150 became 100 (this model takes 1 to 100).",
        "Guidance scale (CFG) 25 became 20 (this model takes 0 to 20).",
        "Width 1024 became 512 (this model takes 64 to 512).",
        "Height 500 became 496 (this model takes 64 to 512).",
        "Text to image has no clip skip setting: not sent.",
    ]
