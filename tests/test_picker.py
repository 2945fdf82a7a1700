"""The model picker and the LoRA list (issues #13 §7 and #14): the real ``app.py``, driven with gradio_client.

The app serves a tiny random SD 1.x-shaped model saved by diffusers, with a LoRA folder holding a
random LoRA for it; the picker switches to a tiny model with SD-Turbo's scheduler file (few-step
defaults), to a broken one (refused, the old model kept), and to the bundled tiny model (its own
size bounds). Each test that switches switches back. The choices the app makes without a model
(the default model, the tiny decoder, the recommended settings) are unit-tested without one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import HUB_LAYOUTS, build_tiny_reference_pipeline
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_app import (APP, EXAMPLE_IMAGE, FAST, REPO, gallery_images, make_tiny_model, page_text, pixels, serve_app,
                      text_to_image, wait_for)
from test_lora import kohya_keys, random_lora, write

from stable_diffusion import cpu_conv
from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.hub import DEFAULT_MODEL, DEFAULT_TINY_VAE, ModelLoadError, load
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.request import GenerationRequest
from stable_diffusion.schedules import SchedulerConfig
from stable_diffusion.taesd import TAESDConfig, TinyAutoencoder
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import AutoencoderKL, VAEConfig
from stable_diffusion.weights import build_on_meta
from webui.generation import Controls, stream_generation, with_lora_tag
from webui.models import (FEW_STEP, LCM_DISTILLED, LCM_PLAIN, SD_TURBO, STANDARD, ModelLoader, default_source,
                          known_models, recommended, warm_up)
from webui.served import ServedModel, switch_model

TINY_SHAPES = REPO / "models" / "tiny-shapes"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
LORA = "tiny-style"


def scheduler(repo: str, **changes: object) -> SchedulerConfig:
    """A Hub repo's own scheduler file, as the loader reads it."""
    config = json.loads((HUB_LAYOUTS / repo / SCHEDULER_FILE).read_text())
    return SchedulerConfig.from_hub_config({**config, **changes})


def pipe_on_meta(scheduler_config: SchedulerConfig, *, time_cond_proj_dim: int | None = None,
                 tiny_vae: bool = False) -> StableDiffusion:
    """A tiny model without weights: what ``recommended`` reads is its configs."""
    return StableDiffusion(
        text_encoder=build_on_meta(CLIPTextModel, CLIPTextConfig.tiny()),
        unet=build_on_meta(UNet, dataclasses.replace(UNetConfig.tiny(), time_cond_proj_dim=time_cond_proj_dim)),
        vae=build_on_meta(AutoencoderKL, VAEConfig.tiny()),
        tokenizer=None,
        scheduler=scheduler_config,
        tiny_vae=build_on_meta(TinyAutoencoder, TAESDConfig.tiny()) if tiny_vae else None,
    )


def config_component(url: str, elem_id: str) -> dict:
    with urllib.request.urlopen(url + "config", timeout=10) as response:
        components = json.load(response)["components"]
    return next(c for c in components if c["props"].get("elem_id") == elem_id)


def load_model(client: Client, model: str) -> tuple[str, str]:
    """The picker's Load button through the API: the title and header of the model served after it."""
    return client.predict(model, api_name="/load_model")


# ------------------------------------------------------------------------------------ without a model
@pytest.mark.parametrize(("device", "expected"), [("cpu", SD_TURBO), ("cuda", DEFAULT_MODEL), ("cuda:1", DEFAULT_MODEL),
                                                  ("mps", DEFAULT_MODEL)])
def test_default_model_is_sd_turbo_on_a_cpu_and_sd15_on_a_gpu(device: str, expected: str) -> None:
    assert default_source(torch.device(device)) == expected


def test_tiny_decoder_goes_with_few_step_models_on_a_cpu_unless_told_otherwise() -> None:
    known = tuple(known_models(TINY_SHAPES))
    cpu = ModelLoader(torch.device("cpu"), torch.float32, known=known)
    assert cpu.tiny_vae_for(SD_TURBO) == DEFAULT_TINY_VAE
    assert cpu.tiny_vae_for(DEFAULT_MODEL) is None
    assert cpu.tiny_vae_for("./my-model") is None
    assert ModelLoader(torch.device("cuda"), torch.float16, known=known).tiny_vae_for(SD_TURBO) is None
    # --tiny-vae none
    assert ModelLoader(torch.device("cpu"), torch.float32, auto_tiny_vae=False, known=known).tiny_vae_for(
        SD_TURBO) is None
    # --tiny-vae SOURCE: every model whose latents are SD's, but not the bundled model's own latent space.
    given = ModelLoader(torch.device("cuda"), torch.float16, tiny_vae="./taesd", auto_tiny_vae=False, known=known)
    assert [given.tiny_vae_for(source) for source in (DEFAULT_MODEL, "./my-model", str(TINY_SHAPES))] == [
        "./taesd", "./taesd", None]


def test_recommended_settings_are_read_from_the_model() -> None:
    assert recommended(None) == STANDARD
    assert recommended(pipe_on_meta(scheduler("stable-diffusion-v1-5"))) == STANDARD
    assert recommended(pipe_on_meta(scheduler("stable-diffusion-2-1"))) == STANDARD  # v-prediction, 768 px
    turbo = recommended(pipe_on_meta(scheduler("sd-turbo")))
    assert turbo == FEW_STEP and (turbo.sampler, turbo.steps, turbo.guidance_scale, turbo.decoder) == (
        "euler_a", 1, 0.0, "full")
    assert recommended(pipe_on_meta(scheduler("sd-turbo"), tiny_vae=True)).decoder == "tiny"
    # Zero-terminal-SNR models space their steps "trailing" too, but predict v and want many steps.
    zero_snr = scheduler("stable-diffusion-2-1", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    assert recommended(pipe_on_meta(zero_snr)) == STANDARD
    # LCM: a guidance-distilled UNet (LCM Dreamshaper) or an LCM scheduler file on a plain UNet.
    lcm = scheduler("stable-diffusion-v1-5", original_inference_steps=50, timestep_scaling=10.0)
    assert recommended(pipe_on_meta(lcm, time_cond_proj_dim=256)) == LCM_DISTILLED
    assert recommended(pipe_on_meta(lcm)) == LCM_PLAIN
    assert (LCM_DISTILLED.sampler, LCM_DISTILLED.steps, LCM_DISTILLED.guidance_scale) == ("lcm", 4, 8.0)
    assert LCM_PLAIN.guidance_scale == 1.0


@pytest.mark.parametrize("spacing", ["trailing", None], ids=["few-step", "standard"])
def test_the_warm_up_times_every_convolution_shape_a_first_image_meets(
        spacing: str | None, tmp_path: Path, fresh_cpu_measurements: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_conv, "MIN_FLOPS", 0)  # the tiny model's convolutions are all cheaper than that
    pipe = load(make_tiny_model(tmp_path / "tiny"), device="cpu", dtype=torch.float32)
    pipe = dataclasses.replace(pipe, scheduler=dataclasses.replace(pipe.scheduler, timestep_spacing=spacing))
    settings = recommended(pipe)
    guided = settings.guidance_scale > 1  # the standard settings: each UNet call a batch of two
    assert settings.kind == ("few-step" if spacing else "")
    served = ServedModel(pipe)
    warm_up(served)
    measured = dict(cpu_conv._machine_choices())
    assert len(measured) >= 5 and all(shape.split()[1].startswith("2x" if guided else "1x") for shape in measured)

    def no_timing() -> float:
        raise AssertionError("a convolution shape was timed after the warm-up")

    # The first visitor's image at the page's defaults has nothing left to time.
    monkeypatch.setattr(cpu_conv, "_clock", no_timing)
    request = GenerationRequest("a red circle", steps=settings.steps, sampler=settings.sampler,
                                guidance_scale=settings.guidance_scale, seed=5)
    assert served.generate([request], door="page")[0].images[0].size == (64, 64)
    assert cpu_conv._machine_choices() == measured


def test_a_failed_warm_up_is_logged_and_the_server_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    pipe = load(make_tiny_model(tmp_path / "tiny"), device="cpu", dtype=torch.float32)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(pipe, "generate", out_of_memory)
    warm_up(ServedModel(pipe))  # does not raise
    assert "Warm-up image failed" in caplog.text and "out of memory, say" in caplog.text
    warm_up(ServedModel(None))  # no model: nothing to warm up


def test_a_page_request_behind_the_warm_up_is_told_what_it_waits_for(tmp_path: Path) -> None:
    served = ServedModel(load(make_tiny_model(tmp_path / "tiny"), device="cpu", dtype=torch.float32))
    settings = dict(FAST, seed=3)
    shown: list[str] = []

    def progress(value: object, *, desc: str, unit: str = "") -> None:
        shown.append(desc)

    # Nobody ahead: no word of waiting.
    updates = list(stream_generation(served, "a red circle", dict(settings), None, progress))
    assert len(updates[-1][0]) == 1 and not any("Waiting" in str(update[2]) for update in updates)

    holding, release = threading.Event(), threading.Event()

    def warm_up_job() -> None:
        with served.queue.turn("txt2img", door="warm-up"):
            holding.set()
            release.wait(60)

    threading.Thread(target=warm_up_job, daemon=True).start()
    assert holding.wait(10)
    shown.clear()
    stream = stream_generation(served, "a red circle", dict(settings), None, progress)
    first = next(stream)  # while the warm-up holds the model
    assert first[2].startswith("Waiting for the server's warm-up image") and shown == [first[2]]
    release.set()
    rest = list(stream)
    assert not any("Waiting" in str(update[2]) for update in rest)
    assert len(rest[-1][0]) == 1 and rest[-1][0][0][1] == "seed 3"


def test_insert_appends_a_lora_tag() -> None:
    assert with_lora_tag("a red circle", "style") == "a red circle <lora:style:0.8>"
    assert with_lora_tag("a cat  ", "b") == "a cat <lora:b:0.8>"
    assert with_lora_tag(" ", "style") == "<lora:style:0.8>"


def test_controls_take_the_models_defaults_and_bounds() -> None:
    import gradio as gr

    turbo = pipe_on_meta(scheduler("sd-turbo"), tiny_vae=True)
    served = ServedModel(turbo)
    with gr.Blocks():
        controls = Controls(served, prefix="t2i", auto_size=False, placeholder="")
    assert (controls.sampler.value, controls.steps.value, controls.guidance_scale.value) == ("euler_a", 1, 0.0)
    assert controls.decoder.visible and controls.decoder.value == "tiny"
    assert (controls.width.minimum, controls.width.value) == (64, 64)  # the tiny UNet's native size
    updates = controls.updates(pipe_on_meta(scheduler("stable-diffusion-v1-5")), placeholder="a fox")
    shown = {component.elem_id: update for component, update in updates.items()}
    assert (shown["t2i-sampler"], shown["t2i-steps"], shown["t2i-guidance-scale"]) == ("dpmpp_2m_karras", 20, 7.5)
    assert shown["t2i-decoder"]["visible"] is False and shown["t2i-decoder"]["value"] == "full"
    assert shown["t2i-prompt"]["placeholder"] == "a fox"
    # After a switch the components' own bounds (those API calls are checked against) follow.
    thirty_two = dataclasses.replace(pipe_on_meta(scheduler("stable-diffusion-v1-5")),
                                     unet=build_on_meta(UNet, dataclasses.replace(UNetConfig.tiny(), sample_size=4)))
    controls.follow(thirty_two)
    assert (controls.width.minimum, controls.height.minimum) == (32, 32)


# ------------------------------------------------------------------------------------ switching, unit
def test_switch_frees_the_old_model_first_and_restores_it_when_the_new_one_fails(tiny_sd1_folder: Path,
                                                                                 tmp_path: Path) -> None:
    turbo = make_tiny_model(tmp_path / "tiny-turbo")
    calls = []

    def loader(source: str, *, device: str | None = None) -> StableDiffusion:
        calls.append((Path(source).name, device, served.pipe.device.type if served.pipe is not None else None))
        if device is None and source == "fails-after-the-check":
            raise ModelLoadError("out of memory, say")
        real = str(turbo) if source == "fails-after-the-check" else source
        return load(real, device=device or "cpu", dtype=torch.float32)

    served = ServedModel(load(tiny_sd1_folder, device="cpu", dtype=torch.float32), source=str(tiny_sd1_folder),
                         loader=loader)
    old = served.pipe
    seen = []
    served.switched.append(lambda pipe: seen.append(pipe.name))
    switch_model(served, str(turbo))
    # Checked on the meta device while the old model still served, then loaded after the old one was freed.
    assert calls == [("tiny-turbo", "meta", "cpu"), ("tiny-turbo", None, "meta")]
    assert served.pipe.name == "tiny-turbo" and served.source == str(turbo) and seen == ["tiny-turbo"]
    assert old.device.type == "meta"

    # A model that passes the check but fails to load: the old model is loaded again.
    before = served.pipe
    with pytest.raises(ModelLoadError, match="out of memory"):
        switch_model(served, "fails-after-the-check")
    assert served.pipe is not before and served.pipe.name == "tiny-turbo" and served.source == str(turbo)
    assert served.pipe.device.type == "cpu" and served.notice == "" and seen == ["tiny-turbo"]
    assert served.pipe.text_to_image("a red circle", steps=2, seed=1).images[0].size == (64, 64)

    # A model that fails the check never touches the one served.
    kept = served.pipe
    with pytest.raises(ModelLoadError, match="There is no file or folder"):
        switch_model(served, str(tmp_path / "missing"))
    assert served.pipe is kept and kept.device.type == "cpu"


# ------------------------------------------------------------------------------------ the app
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_sd1_folder: Path) -> dict[str, Path]:
    """The served model (diffusers' tiny SD 1.x), its LoRA folder, a few-step model and a broken one."""
    folder = tmp_path_factory.mktemp("picker")
    turbo = make_tiny_model(folder / "tiny-turbo")
    # SD-Turbo's own scheduler file: Euler, trailing spacing.
    shutil.copyfile(HUB_LAYOUTS / "sd-turbo" / SCHEDULER_FILE, turbo / SCHEDULER_FILE)
    broken = shutil.copytree(turbo, folder / "tiny-broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    loras = folder / "loras"
    loras.mkdir()
    # alpha 0.5 (of rank 4): a change the tiny random model takes without diverging.
    write(loras, LORA, kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=3, alpha=lambda _: 0.5)))
    return {"base": tiny_sd1_folder, "turbo": turbo, "broken": broken, "loras": loras}


@pytest.fixture(scope="module")
def app_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("picker-log") / "app.log"


@pytest.fixture(scope="module")
def app_url(models: dict[str, Path], app_log: Path) -> Iterator[str]:
    with serve_app("--model", str(models["base"]), "--device", "cpu", "--dtype", "float32", "--lora-dir",
                   str(models["loras"]), log=app_log) as url:
        yield url


@pytest.fixture()
def client(app_url: str, tmp_path: Path) -> Client:
    return Client(app_url, verbose=False, download_files=str(tmp_path))


@pytest.fixture()
def base(client: Client, models: dict[str, Path]) -> Iterator[str]:
    """The served model's title; the test may switch, the model is switched back afterwards."""
    title = models["base"].name
    yield title
    assert load_model(client, title)[0] == title


def test_switch_to_a_few_step_model_sets_its_defaults(client: Client, models: dict[str, Path], base: str) -> None:
    title, header = load_model(client, str(models["turbo"]))
    assert title == "tiny-turbo"
    assert "Model **tiny-turbo** on **cpu** in **float32**" in header
    assert "a few-step model: 1 step, guidance 0, Euler a" in header
    _gallery, parameters = text_to_image(client, "a red circle", seed=2, sampler="euler_a", steps=1,
                                         guidance_scale=0.0)
    assert "Steps: 1, Sampler: Euler a, CFG scale: 0" in parameters and "Model: tiny-turbo" in parameters
    # The same title again: nothing to load.
    assert load_model(client, "tiny-turbo")[0] == "tiny-turbo"
    # Back to a model of the list, by its title.
    title, header = load_model(client, base)
    assert title == base and "few-step" not in header
    assert f"Model: {base}" in text_to_image(client, "a red circle", seed=2)[1]


def test_a_failed_switch_keeps_the_model_and_says_why(client: Client, models: dict[str, Path], base: str,
                                                      app_log: Path) -> None:
    cases = [
        (str(models["broken"]), "is not a complete Stable Diffusion model in the diffusers layout: missing unet/"),
        (str(models["base"].parent / "no-such-model"), "There is no file or folder at"),
        ("stabilityai/sd-turbo", "it is not (completely) in the local Hugging Face cache"),  # the app runs offline
    ]
    log_start = len(app_log.read_text())
    for model, reason in cases:
        with pytest.raises(AppError) as error:
            load_model(client, model)
        assert f"Could not load {model}: " in str(error.value) and reason in str(error.value)
        assert str(error.value).endswith(f"Still serving {base}.")
    for hostile in (["tiny-turbo"], 7, "", "x" * 1001):
        with pytest.raises(AppError, match="Model must be one of .*stabilityai/sd-turbo"):
            load_model(client, hostile)
    assert "Traceback" not in app_log.read_text()[log_start:]
    assert f"Model: {base}" in text_to_image(client, "a red circle", seed=1)[1]


def test_a_switch_waits_for_the_running_generation(app_url: str, models: dict[str, Path], base: str,
                                                   app_log: Path, tmp_path: Path) -> None:
    first = Client(app_url, verbose=False, download_files=str(tmp_path / "first"))
    switcher = Client(app_url, verbose=False, download_files=str(tmp_path / "switcher"))
    log_start = len(app_log.read_text())
    running = first.submit("a red circle", "", "euler", 100, 7.5, 64, 64, 3, 1, api_name="/text_to_image")
    wait_for(lambda: running.outputs(), "the first preview")
    switch = switcher.submit(str(models["turbo"]), api_name="/load_model")
    _gallery, _preview, parameters = running.result(timeout=300)
    assert switch.result(timeout=300)[0] == "tiny-turbo"
    assert "Steps: 100" in parameters and f"Model: {base}" in parameters  # all its steps on the old model
    assert "Model: tiny-turbo" in text_to_image(first, "a red circle", seed=3)[1]
    log = app_log.read_text()[log_start:]
    assert log.index("Job finished: txt2img") < log.index("Job started: load model")
    assert re.search(r"Job finished: txt2img via page in \d+\.\d\d s", log)  # how long it held the model


def test_api_clients_get_the_new_models_bounds(client: Client, app_url: str, base: str, tmp_path: Path) -> None:
    # The served model draws 16 px images (a 2-level VAE); the bundled one takes 32 px and more.
    assert gallery_images(text_to_image(client, "a red circle", seed=1, width=16, height=16)[0])[0].size == (16, 16)
    assert load_model(client, "tiny-shapes")[0] == "tiny-shapes"
    fresh = Client(app_url, verbose=False, download_files=str(tmp_path / "fresh"))
    for api_client in (client, fresh):
        with pytest.raises(AppError, match="Width must be a number from 32 to 1024, got 16"):
            text_to_image(api_client, "a red circle", seed=1, width=16, height=16)
    gallery, parameters = text_to_image(fresh, "a red circle on a blue background", seed=1, width=32, height=32)
    assert gallery_images(gallery)[0].size == (32, 32) and "Model: tiny-shapes" in parameters


def test_the_rest_api_lists_and_switches_the_pickers_models(app_url: str, base: str) -> None:
    picker = config_component(app_url, "model-picker")["props"]
    titles = [model["title"] for model in requests.get(f"{app_url}sdapi/v1/sd-models", timeout=30).json()]
    assert titles == [value for _label, value in picker["choices"]] == [
        base, DEFAULT_MODEL, SD_TURBO, "SimianLuo/LCM_Dreamshaper_v7", "tiny-shapes"]
    assert picker["value"] == base
    assert requests.post(f"{app_url}sdapi/v1/options", json={"sd_model_checkpoint": "tiny-shapes"},
                         timeout=120).status_code == 200
    assert requests.get(f"{app_url}sdapi/v1/options", timeout=30).json()["sd_model_checkpoint"] == "tiny-shapes"


def test_lora_list_and_tagged_prompts_in_every_tab(client: Client, app_url: str, models: dict[str, Path],
                                                   base: str) -> None:
    for prefix in ("t2i", "i2i"):
        lora = config_component(app_url, f"{prefix}-lora")["props"]
        assert [value for _label, value in lora["choices"]] == [LORA] and lora["value"] == LORA
    tagged = f"a (red:1.3) circle {with_lora_tag('', LORA)}"
    gallery, parameters = text_to_image(client, tagged, seed=4)
    assert parameters.startswith(tagged + "\n")  # the PNG keeps the tag
    pipe = load(models["base"], device="cpu", dtype=torch.float32, lora_dirs=[models["loras"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1), so float sums round the same
    try:
        expected = pipe.text_to_image(tagged, seed=4, **FAST).images[0]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(pixels(gallery_images(gallery)[0]), pixels(expected))
    plain, _ = text_to_image(client, "a (red:1.3) circle", seed=4)
    assert not np.array_equal(pixels(gallery_images(plain)[0]), pixels(expected))

    _gallery, _preview, parameters = client.predict(
        handle_file(str(EXAMPLE_IMAGE)), 0.6, tagged, "", "euler", 3, 5.0, 64, 64, 7, 1, api_name="/image_to_image")
    assert parameters.startswith(tagged + "\n")
    with pytest.raises(AppError, match="unknown LoRA 'missing'.*Available: tiny-style"):
        text_to_image(client, "a red circle <lora:missing:1>", seed=1)


# ------------------------------------------------------------------------------------ starting
def test_without_a_model_flag_a_cpu_asks_for_sd_turbo_and_offline_gets_the_bundled_model(tmp_path: Path) -> None:
    with serve_app("--device", "cpu", "--dtype", "float32", log=tmp_path / "app.log") as url:
        text = page_text(url)
        # SD-Turbo comes with the tiny decoder on a CPU: that is what the offline cache lacked first.
        assert "Could not load `stabilityai/sd-turbo`: Cannot load 'madebyollin/taesd'" in text
        assert "Model **tiny-shapes** on **cpu**" in text and "Running the bundled tiny model" in text


def test_a_missing_lora_folder_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(APP), "--lora-dir", str(tmp_path / "nowhere")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"app.py: error: --lora-dir {tmp_path / 'nowhere'}: there is no such folder" in result.stderr
