"""The web UI's REST API (``/sdapi/v1``) of the real ``app.py``, driven by the real ``webuiapi`` client.

The app runs in a subprocess on the bundled tiny model (``models/tiny-shapes``, 32 px), as a user
would start it offline; pictures are judged by the shapes analyzer. Checked: every endpoint
through ``webuiapi``, seeds, the same image and PNG parameters as ``gradio_client``, one queue
for the page and the API (never two generations at once), progress and interrupt across doors,
hostile requests (each a 4xx with a message, the server stays up), logins and ``--no-api``.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import assert_same_picture
from stable_diffusion.pipelines import GenerationCancelled
from test_app import APP, EXAMPLE_IMAGE, REPO, gallery_images, make_tiny_model, pixels, serve_app, text_to_image, wait_for
from tiny_shapes.scoring import analyze, parse_caption, score
from webui.jobs import GenerationQueue
from webui.sdapi_translate import sampler_key

TINY_SHAPES = REPO / "models" / "tiny-shapes"
CIRCLE = "a red circle on a blue background"
PICKER_MODELS = ["stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/sd-turbo", "SimianLuo/LCM_Dreamshaper_v7"]
# Quick settings for the tiny model on two shared CPU cores.
QUICK = dict(sampler_name="Euler", steps=4, cfg_scale=4.0, width=32, height=32)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def app_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdapi-log") / "app.log"


@pytest.fixture(scope="module")
def app_url(app_log: Path) -> Iterator[str]:
    with serve_app("--model", str(TINY_SHAPES), "--device", "cpu", "--dtype", "float32", log=app_log) as url:
        yield url


@pytest.fixture()
def api(app_url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{app_url}sdapi/v1")


@pytest.fixture()
def client(app_url: str, tmp_path: Path) -> Client:
    return Client(app_url, verbose=False, download_files=str(tmp_path))


def post(url: str, endpoint: str, body: bytes | dict, **options) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}sdapi/v1/{endpoint}", data=data, timeout=120, **options)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def running_step(url: str) -> int:
    state = requests.get(f"{url}sdapi/v1/progress", params={"skip_current_image": True}, timeout=30).json()["state"]
    return state["sampling_step"] if state["job"] else 0


# ------------------------------------------------------------------------------------ the parts alone
def test_queue_serves_one_at_a_time_in_arrival_order() -> None:
    queue, order, inside, overlaps = GenerationQueue(), [], [], []
    release = threading.Event()

    def work(name: str) -> None:
        with queue.turn(name, door="test"):
            if inside:
                overlaps.append((name, list(inside)))
            inside.append(name)
            order.append(name)
            release.wait(timeout=30)
            inside.remove(name)

    first = threading.Thread(target=work, args=("first",))
    first.start()
    wait_for(lambda: queue.running is not None, "the first job")
    waiters = []
    for name in ("second", "third", "fourth"):
        waiters.append(threading.Thread(target=work, args=(name,)))
        waiters[-1].start()
        wait_for(lambda: queue.waiting == len(waiters), f"{name} to queue")
    release.set()
    for thread in [first, *waiters]:
        thread.join(timeout=30)
    assert order == ["first", "second", "third", "fourth"] and not overlaps
    assert queue.running is None and queue.waiting == 0


def test_a_cancelled_request_leaves_the_line_and_an_interrupt_stops_the_running_job() -> None:
    queue, cancel, release, stopped = GenerationQueue(), threading.Event(), threading.Event(), []

    def hold() -> None:
        with queue.turn("holder", door="test") as job:
            token = job.stop_when(None)
            release.wait(timeout=30)
            stopped.append(token.is_set())

    holder = threading.Thread(target=hold)
    holder.start()
    wait_for(lambda: queue.running is not None, "the holder")
    with ThreadPoolExecutor(1) as pool:
        def wait_in_line() -> None:
            with queue.turn("waiter", door="test"):
                pass

        def give_up() -> None:
            with queue.turn("quitter", door="test", cancel=cancel):
                pytest.fail("a cancelled request ran")

        quitter = pool.submit(give_up)
        wait_for(lambda: queue.waiting == 1, "the quitter to queue")
        cancel.set()
        with pytest.raises(GenerationCancelled, match="waiting for its turn"):
            quitter.result(timeout=30)
        assert queue.waiting == 0
        waiter = threading.Thread(target=wait_in_line)
        waiter.start()
        assert queue.interrupt()
        release.set()
        holder.join(timeout=30)
        waiter.join(timeout=30)
    assert stopped == [True]  # the holder's cancel token was set by the interrupt
    assert not waiter.is_alive() and queue.running is None and not queue.interrupt()


@pytest.mark.parametrize(("sampler_name", "scheduler", "ours"), [
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # the older web UIs' names
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),  # the newer ones'
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),  # since web UI 1.9 its default schedule
    ("DPM++ 2M", None, "dpmpp_2m_karras"),
    ("DPM++ 2M", "uniform", "dpmpp_2m"),
    ("DPM++ 2M Karras", "Uniform", "dpmpp_2m_karras"),  # a schedule in the name wins, as in the web UI
    ("Euler a", "automatic", "euler_a"), ("Euler", "Karras", "euler_karras"), ("euler", None, "euler"),
    ("DDIM", None, "ddim"), ("DDPM", None, "ddpm"), ("LCM", None, "lcm"),
    ("k_euler_a", None, "euler_a"), ("dpmpp_2m", None, "dpmpp_2m"), (None, None, "dpmpp_2m_karras"),
])
def test_web_ui_sampler_names(sampler_name: str | None, scheduler: str | None, ours: str) -> None:
    assert sampler_key(sampler_name, scheduler) == ours


# ------------------------------------------------------------------------------------ generation
def test_webuiapi_txt2img_on_the_bundled_model(api: webuiapi.WebUIApi) -> None:
    # The client's defaults: Euler a, scheduler "automatic", 20 steps, CFG 7.
    result = api.txt2img(prompt=CIRCLE, seed=5, width=32, height=32)
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5]
    assert result.image.size == (32, 32)
    infotext = result.info["infotexts"][0]
    assert result.image.info["parameters"] == infotext  # the PNG carries the parameters, as the page's do
    assert "Seed: 5" in infotext and "Sampler: Euler a" in infotext and "Steps: 20" in infotext
    # The right picture at the client's defaults: a red circle on a blue background.
    assert score(result.image, parse_caption(CIRCLE))["all"], analyze(result.image)

    # The newer web UIs' form: sampler and schedule apart. The right picture in full.
    karras = api.txt2img(prompt=CIRCLE, seed=5, width=32, height=32, sampler_name="DPM++ 2M", scheduler="Karras")
    assert score(karras.image, parse_caption(CIRCLE))["all"], analyze(karras.image)
    assert "Sampler: DPM++ 2M Karras" in karras.info["infotexts"][0]
    assert karras.info["sampler_name"] == "DPM++ 2M"
    assert karras.info["extra_generation_params"] == {"Schedule type": "Karras"}


def test_seeds_reproduce_and_continue_over_batches(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt=CIRCLE, seed=100, batch_size=2, n_iter=2, **QUICK)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [100, 101, 102, 103]
    assert [f"Seed: {seed}," in text for seed, text in zip(range(100, 104), result.info["infotexts"])] == [True] * 4
    again = api.txt2img(prompt=CIRCLE, seed=100, batch_size=2, n_iter=2, **QUICK)
    for first, second in zip(result.images, again.images):
        np.testing.assert_array_equal(pixels(first), pixels(second))
    # Image 3 alone: the same noise, run as a batch of one.
    alone = api.txt2img(prompt=CIRCLE, seed=102, **QUICK)
    assert_same_picture(pixels(alone.image), pixels(result.images[2]))
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))

    drawn = api.txt2img(prompt=CIRCLE, seed=-1, **QUICK)
    seed = drawn.info["seed"]
    assert seed >= 0 and f"Seed: {seed}," in drawn.info["infotexts"][0]
    np.testing.assert_array_equal(pixels(api.txt2img(prompt=CIRCLE, seed=seed, **QUICK).image), pixels(drawn.image))


def test_rest_image_equals_the_gradio_client_image(api: webuiapi.WebUIApi, client: Client) -> None:
    prompt = "a (red:1.2) circle on a blue background"  # weighted, read the same way by both doors
    rest = api.txt2img(prompt=prompt, negative_prompt="a green square", seed=11, sampler_name="DPM++ 2M Karras",
                       steps=5, cfg_scale=5.0, width=40, height=32)
    gallery, parameters = text_to_image(client, prompt, seed=11, negative_prompt="a green square",
                                        sampler="dpmpp_2m_karras", steps=5, guidance_scale=5.0, width=40, height=32)
    page = gallery_images(gallery)[0]
    np.testing.assert_array_equal(pixels(rest.image), pixels(page))
    assert rest.image.info["parameters"] == page.info["parameters"] == parameters

    source = Image.open(EXAMPLE_IMAGE)
    rest = api.img2img(images=[source], prompt=CIRCLE, denoising_strength=0.6, seed=7, sampler_name="Euler a",
                       steps=5, cfg_scale=4.0, width=32, height=32)
    gallery, _preview, parameters = client.predict(
        handle_file(str(EXAMPLE_IMAGE)), 0.6, CIRCLE, "", "euler_a", 5, 4.0, 32, 32, 7, 1, api_name="/image_to_image")
    page = gallery_images(gallery)[0]
    np.testing.assert_array_equal(pixels(rest.image), pixels(page))
    assert rest.image.info["parameters"] == parameters and "Denoising strength: 0.6" in parameters
    assert rest.info["denoising_strength"] == 0.6


def test_png_info_reads_the_parameters_back(api: webuiapi.WebUIApi) -> None:
    made = api.txt2img(prompt=CIRCLE, negative_prompt="a green square", seed=21, sampler_name="DPM++ 2M",
                       scheduler="Uniform", steps=4, cfg_scale=4.0, width=32, height=32)
    read = api.png_info(made.image)
    assert read.info == made.info["infotexts"][0]
    fields = read.json["parameters"]
    assert fields["Prompt"] == CIRCLE and fields["Negative prompt"] == "a green square"
    assert (fields["Seed"], fields["Steps"], fields["Size-1"], fields["Size-2"]) == ("21", "4", 32, 32)
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Uniform")
    # The fields sent back make the same picture.
    again = api.txt2img(prompt=fields["Prompt"], negative_prompt=fields["Negative prompt"], seed=int(fields["Seed"]),
                        sampler_name=fields["Sampler"], scheduler=fields["Schedule type"], steps=int(fields["Steps"]),
                        cfg_scale=float(fields["CFG scale"]), width=fields["Size-1"], height=fields["Size-2"])
    np.testing.assert_array_equal(pixels(again.image), pixels(made.image))
    assert api.png_info(Image.new("RGB", (8, 8))).info == ""


# ------------------------------------------------------------------------------------ the rest
def test_models_samplers_and_options(api: webuiapi.WebUIApi) -> None:
    # The served model, then the app's model picker's (tests/test_picker.py checks they are the same).
    assert [model["title"] for model in api.get_sd_models()] == ["tiny-shapes", *PICKER_MODELS]
    assert api.get_options()["sd_model_checkpoint"] == "tiny-shapes"
    samplers = {sampler["name"]: sampler for sampler in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "DDPM", "LCM"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"} and "k_dpmpp_2m" in samplers["DPM++ 2M"]["aliases"]
    assert [scheduler["label"] for scheduler in api.get_schedulers()] == ["Automatic", "Uniform", "Karras"]
    # Open WebUI posts the whole of GET options back with the model changed: the same model is a no-op.
    assert api.set_options({**api.get_options(), "some_other_setting": 3}) is None  # the web UI answers null
    assert api.get_options()["sd_model_checkpoint"] == "tiny-shapes"
    wrong = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "no-such-model"})
    assert wrong.status_code == 422 and "use one of 'tiny-shapes'" in wrong.json()["detail"]


def test_progress_and_interrupt_of_an_api_generation(app_url: str, api: webuiapi.WebUIApi) -> None:
    long = dict(prompt=CIRCLE, seed=3, steps=100, width=128, height=128)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(post, app_url, "txt2img", long)
        wait_for(lambda: running_step(app_url) >= 1, "the first step", timeout=120)
        progress = api.get_progress()
        assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 100
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (128, 128)
        api.interrupt()
        answer = job.result(timeout=120)
    assert answer.status_code == 409 and "Interrupted" in answer.json()["detail"]
    assert api.get_progress()["state"]["job"] == ""
    assert api.txt2img(prompt=CIRCLE, seed=1, **QUICK).image.size == (32, 32)


def test_interrupt_stops_a_page_generation(app_url: str, api: webuiapi.WebUIApi, client: Client) -> None:
    job = client.submit("a red circle", "", "euler", 100, 7.5, 128, 128, 3, 1, api_name="/text_to_image")
    wait_for(lambda: running_step(app_url) >= 1, "the page's first step", timeout=120)
    assert api.get_progress()["state"]["sampling_steps"] == 100  # the page's job, seen from the API
    api.interrupt()
    with pytest.raises(AppError, match="Stopped before the end"):
        job.result(timeout=120)


def test_page_and_api_share_one_queue(app_url: str, app_log: Path, tmp_path: Path) -> None:
    settings = dict(sampler="euler", steps=20, guidance_scale=4.0, width=64, height=64)

    def page(seed: int) -> np.ndarray:
        client = Client(app_url, verbose=False, download_files=str(tmp_path / f"page-{seed}"))
        return pixels(gallery_images(text_to_image(client, CIRCLE, seed=seed, **settings)[0])[0])

    def rest(seed: int) -> np.ndarray:
        api = webuiapi.WebUIApi(baseurl=f"{app_url}sdapi/v1")
        return pixels(api.txt2img(prompt=CIRCLE, seed=seed, sampler_name="Euler", steps=20, cfg_scale=4.0,
                                  width=64, height=64).image)

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(page, 31), pool.submit(rest, 31), pool.submit(page, 32), pool.submit(rest, 32)]
        images = [job.result(timeout=300) for job in jobs]
    np.testing.assert_array_equal(images[0], images[1])  # each request got exactly its own settings' image
    np.testing.assert_array_equal(images[2], images[3])
    # The queue logs each start and end while it holds the model: they must strictly alternate.
    events = [line.split("Job ")[1].split(":")[0] for line in app_log.read_text().splitlines() if "webui.jobs: Job" in line]
    assert events[: len(events) // 2 * 2] == ["started", "finished"] * (len(events) // 2), events
    assert "txt2img via page" in app_log.read_text() and "txt2img via api" in app_log.read_text()


# ------------------------------------------------------------------------------------ hostile requests
def _huge_png() -> dict:
    buffer = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(buffer, format="PNG")  # 10 kB of PNG, 192 MB as RGB
    return {"init_images": [base64.b64encode(buffer.getvalue()).decode()]}


def _huge_body() -> bytes:
    return b'{"prompt": "' + b"a" * (33 * 2**20) + b'"}'


HOSTILE = [
    ("txt2img", b"{not json", 400, "not valid JSON"),
    ("txt2img", b"", 400, "not valid JSON"),
    ("txt2img", b"[1, 2]", 422, "Input should be an object"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ("txt2img", {"batch_size": [1]}, 422, "batch_size"),
    ("txt2img", {"prompt": "a " * 50_000}, 422, "prompt is too long: 100000 characters"),
    ("txt2img", {"prompt": "red " * 2_000, "steps": 1}, 422, "prompt is too long"),  # over 600 tokens
    ("txt2img", {"width": 68}, 422, "width must be a multiple of 8"),
    ("txt2img", {"width": 2048, "height": 2048}, 422, "width x height 2048x2048"),
    ("txt2img", {"steps": 101}, 422, "steps must be from 1 to 100"),
    ("txt2img", {"batch_size": 5}, 422, "batch_size must be from 1 to 4"),
    ("txt2img", {"batch_size": 2, "n_iter": 3}, 422, "n_iter times batch_size"),
    ("txt2img", {"cfg_scale": 50}, 422, "cfg_scale must be between 0 and 30"),
    ("txt2img", {"seed": -5}, 422, "seed must be"),
    ("txt2img", {"sampler_name": "PLMS"}, 422, "use one of DDPM, DDIM, Euler, Euler a, DPM++ 2M, LCM"),
    ("txt2img", {"sampler_name": "DDIM", "scheduler": "Karras"}, 422, "Karras does not apply to DDIM"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 9}}, 422, "CLIP_stop_at_last_layers must be"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "other"}}, 422, "not the model loaded now"),
    ("img2img", {"prompt": "x"}, 422, "init_images: Field required"),
    ("img2img", {"init_images": "abc"}, 422, "init_images: Input should be a valid array"),
    ("img2img", {"init_images": ["!!!not base64"]}, 422, "init_images[0] is not valid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not a picture").decode()]}, 422, "not an image"),
    ("img2img", {"init_images": ["https://example.com/cat.png"]}, 422, "this server fetches nothing"),
    ("img2img", _huge_png, 422, "has more than 50 megapixels"),
    ("img2img", lambda: {"init_images": [b64(Image.new("RGB", (32, 32)))], "mask": "!!!"}, 422,
     "mask is not valid base64"),
    ("img2img", lambda: {"init_images": [b64(Image.new("RGB", (32, 32)))], "mask": b64(Image.new("L", (32, 32), 255)),
                         "inpainting_fill": 2}, 422, "inpainting_fill must be 0 (fill) or 1 (original)"),
    ("img2img", lambda: {"init_images": [b64(Image.new("RGB", (32, 32)))], "mask": b64(Image.new("L", (32, 32), 0))},
     422, "mask"),
    ("img2img", {"init_images": [], "denoising_strength": 0.5}, 422, "exactly one image"),
    ("png-info", {"image": "%%%"}, 422, "image is not valid base64"),
    ("txt2img", _huge_body, 413, "over 32 MiB"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "message"), HOSTILE,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(HOSTILE)])
def test_bad_requests_get_a_4xx_with_a_message(app_url: str, endpoint: str, body: bytes | dict | Callable,
                                               status: int, message: str) -> None:
    answer = post(app_url, endpoint, body() if callable(body) else body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]
    assert requests.get(f"{app_url}sdapi/v1/options", timeout=30).status_code == 200


def test_server_generates_after_the_bad_requests(app_url: str, api: webuiapi.WebUIApi) -> None:
    # Fields this server lacks (scripts, extensions, hires fix) are ignored, as the web UI ignores unknown ones.
    answer = post(app_url, "txt2img", {"prompt": CIRCLE, "seed": 2, **QUICK, "alwayson_scripts": {"ControlNet": {}},
                                      "enable_hr": False, "restore_faces": False, "no_such_field": [1, 2]})
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    np.testing.assert_array_equal(
        pixels(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))),
        pixels(api.txt2img(prompt=CIRCLE, seed=2, **QUICK).image))


# ------------------------------------------------------------------------------------ logins, switching, flags
@pytest.fixture(scope="module")
def guarded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-random") / "tiny-random")
    log = tmp_path_factory.mktemp("guarded-log") / "app.log"
    with serve_app("--model", str(model), "--device", "cpu", "--dtype", "float32", "--auth", "bob:page-secret",
                   "--api-auth", "alice:api-secret", log=log) as url:
        yield url


def test_img2img_with_a_mask_inpaints_and_keeps_the_rest(api: webuiapi.WebUIApi, client: Client) -> None:
    """The web UI's inpainting fields: the mask (white repaints), its blur, and the picture pasted back."""
    picture = Image.new("RGB", (32, 32), (30, 70, 220))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = api.img2img(images=[picture], mask_image=mask, prompt=CIRCLE, denoising_strength=1.0, mask_blur=0,
                         inpainting_fill=1, seed=3, **QUICK)
    out = pixels(result.image)
    assert out.shape == (32, 32, 3)
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[outside], pixels(picture)[outside])
    assert "Mask blur: 0" in result.info["infotexts"][0] and "Denoising strength: 1" in result.info["infotexts"][0]
    # webuiapi's own default start, "fill" (0), and an inverted mask: the hole is now outside.
    filled = api.img2img(images=[picture], mask_image=mask, prompt=CIRCLE, denoising_strength=0.6, seed=3, mask_blur=0,
                         inpainting_mask_invert=1, **QUICK)
    np.testing.assert_array_equal(pixels(filled.image)[~outside], pixels(picture)[~outside])


def test_logins_guard_the_api(guarded_url: str) -> None:
    url = f"{guarded_url}sdapi/v1/options"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, auth=("alice", "wrong"), timeout=30).status_code == 401
    assert requests.get(url, auth=("alice", "api-secret"), timeout=30).status_code == 200
    assert requests.get(url, auth=("bob", "page-secret"), timeout=30).status_code == 200  # --auth works here too
    assert post(guarded_url, "txt2img", {"steps": 1}).status_code == 401


def test_options_switch_the_model_and_keep_it_on_failure(guarded_url: str) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{guarded_url}sdapi/v1", username="alice", password="api-secret")
    assert [model["title"] for model in api.get_sd_models()] == ["tiny-random", *PICKER_MODELS, "tiny-shapes"]
    assert api.txt2img(prompt=CIRCLE, seed=1, steps=2, width=0, height=0).image.size == (64, 64)  # its native size
    try:
        assert api.set_options({"sd_model_checkpoint": "tiny-shapes"}) is None
        assert api.get_options()["sd_model_checkpoint"] == "tiny-shapes"
        result = api.txt2img(prompt=CIRCLE, seed=5, sampler_name="DPM++ 2M Karras", steps=12, cfg_scale=4.0,
                             width=0, height=0)
        assert result.image.size == (32, 32) and result.info["sd_model_name"] == "tiny-shapes"
        assert score(result.image, parse_caption(CIRCLE))["all"], analyze(result.image)
        assert "not available here" in api.set_options({"sd_model_checkpoint": "tiny-gone"})["detail"]
        assert api.get_options()["sd_model_checkpoint"] == "tiny-shapes"
    finally:
        assert api.set_options({"sd_model_checkpoint": "tiny-random"}) is None
    assert api.get_options()["sd_model_checkpoint"] == "tiny-random"


def test_no_api_flag_turns_the_api_off(tmp_path: Path) -> None:
    with serve_app("--model", str(TINY_SHAPES), "--device", "cpu", "--dtype", "float32", "--no-api",
                   log=tmp_path / "app.log") as url:
        assert requests.get(f"{url}sdapi/v1/options", timeout=30).status_code == 404
        assert requests.get(url, timeout=30).status_code == 200


def test_bad_api_auth_flag_exits_with_a_message() -> None:
    result = subprocess.run([sys.executable, str(APP), "--api-auth", "alice"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "--api-auth must be USER:PASSWORD" in result.stderr
