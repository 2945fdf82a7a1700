"""Few-step generation against diffusers' pipelines, image for image.

* SD-Turbo (SD 2.1-base distilled for 1-4 steps, Sauer et al. 2023): our ``text_to_image(steps=1
  or 4, guidance_scale=0, sampler="euler_a")`` on a model carrying SD-Turbo's own scheduler config
  (Euler, ``"timestep_spacing": "trailing"``) against ``StableDiffusionPipeline`` with
  ``EulerAncestralDiscreteScheduler.from_config(that config)``, decoded by the VAE and by the tiny
  autoencoder (diffusers: ``AutoencoderTiny`` as the pipeline's ``vae``).
* An LCM-distilled UNet (``time_cond_proj_dim``; Luo et al. 2023) with ``sampler="lcm"`` against
  ``LatentConsistencyModelPipeline`` with ``LCMScheduler.from_config(its config)``.
* Plain SD 1.5 with the LCM sampler at guidance 1 (the LCM-LoRA recipe without the LoRA) against
  ``StableDiffusionPipeline`` with ``LCMScheduler.from_config(SD 1.5's config)``.

The CI checks run tiny random networks shaped like SD 2.x / SD 1.x; the ``slow`` ones the real
shapes (SD 2.1-base's and SD 1.5's configs, the real TAESD) with random weights at 512².
Images must agree within 2/255 (``conftest.assert_same_picture``, which says why not exactly).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerAncestralDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import HUB_LAYOUTS, assert_same_picture, build_tiny_reference_pipeline
from stable_diffusion import hub
from stable_diffusion.hub import load
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.taesd import TAESDConfig
from test_samplers import LCM_CONFIGS
from test_taesd import lively

PROMPT = "a cinematic photo of a red fox in the snow"
TINY_SIZE = 32  # pixels; the tiny VAE downsamples 2x
TURBO_SCHEDULER = json.loads((HUB_LAYOUTS / "sd-turbo" / "scheduler" / "scheduler_config.json").read_text())
SD15_SCHEDULER = json.loads((HUB_LAYOUTS / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").read_text())
# An LCM-distilled model's own scheduler file (LCM_Dreamshaper_v7's LCM keys on SD 1.5's file).
LCM_SCHEDULER = {**SD15_SCHEDULER, **LCM_CONFIGS["distilled"]}
# The tiny SD VAE downsamples 2x: its tiny autoencoder has two levels.
TINY_TAESD = TAESDConfig(encoder_channels=8, decoder_channels=8, num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))


# ------------------------------------------------------------------------------------- helpers
def saved(pipe, folder: Path, scheduler_config: dict) -> Path:
    """``pipe`` in the Hub's folder layout, with the model's own scheduler file (not the class's defaults)."""
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    return folder


def with_lcm_unet(pipe: StableDiffusionPipeline, *, time_cond_proj_dim: int) -> LatentConsistencyModelPipeline:
    """``pipe``'s networks with a UNet that takes the guidance embedding, as LatentConsistencyModelPipeline."""
    # Without the config's private keys: "_use_default_values" would reset time_cond_proj_dim.
    config = {key: value for key, value in pipe.unet.config.items() if not key.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": time_cond_proj_dim})
    state = unet.state_dict()
    state.update(pipe.unet.state_dict())  # every weight but the new guidance projection (random)
    unet.load_state_dict(state)
    parts = {**pipe.components, "unet": unet.eval(), "scheduler": LCMScheduler.from_config(LCM_SCHEDULER)}
    return LatentConsistencyModelPipeline(**parts)


def reference_images(pipe, *, size: int, steps: int, guidance_scale: float, seed: int) -> np.ndarray:
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=[torch.Generator().manual_seed(seed)], output_type="np").images
    return (out * 255).round().astype(np.int16)


def assert_matches(ours: StableDiffusion, reference, *, size: int, steps: int, guidance_scale: float, sampler: str,
                   decoder: str = "full", seed: int = 7) -> None:
    expected = reference_images(reference, size=size, steps=steps, guidance_scale=guidance_scale, seed=seed)
    result = ours.text_to_image(PROMPT, width=size, height=size, steps=steps, guidance_scale=guidance_scale,
                                sampler=sampler, decoder=decoder, seed=seed)
    image = np.asarray(result.images[0], dtype=np.int16)
    # A flat image would agree with anything: the random networks must draw something.
    assert expected.std() > 2
    assert_same_picture(image, expected[0])


def turbo_models(reference: StableDiffusionPipeline, taesd: AutoencoderTiny, folder: Path):
    """Ours loaded from ``reference`` saved with SD-Turbo's scheduler file and ``taesd``; the reference
    with ``EulerAncestralDiscreteScheduler.from_config(that file)``; ``taesd``; the folder of both."""
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
    taesd.save_pretrained(folder / "taesd")
    ours = load(saved(reference, folder / "model", TURBO_SCHEDULER), device="cpu", dtype=torch.float32,
                tiny_vae=folder / "taesd")
    return ours, reference, taesd, folder


def components(pipe: StableDiffusionPipeline, **changes) -> dict:
    """The reference pipeline's parts, some replaced, without the LCM pipeline's extra keys."""
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    parts = {key: pipe.components[key] for key in keep}
    return {**parts, **changes, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


# ------------------------------------------------------------------------------- tiny models (CI)
@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory) -> tuple[StableDiffusion, StableDiffusionPipeline, AutoencoderTiny, Path]:
    """Tiny SD 2.x-shaped networks with SD-Turbo's scheduler file: ours, diffusers', and a tiny autoencoder."""
    reference = build_tiny_reference_pipeline("sd2")
    taesd = lively(AutoencoderTiny.from_config(TINY_TAESD.to_hub_config()))
    return turbo_models(reference, taesd, tmp_path_factory.mktemp("tiny-sd-turbo"))


@pytest.mark.parametrize("decoder", ["full", "tiny"])
@pytest.mark.parametrize("steps", [1, 4])
def test_sd_turbo_matches_diffusers(turbo, steps: int, decoder: str) -> None:
    ours, reference, taesd, _ = turbo
    if decoder == "tiny":
        reference = StableDiffusionPipeline(**components(reference, vae=taesd))
    assert_matches(ours, reference, size=TINY_SIZE, steps=steps, guidance_scale=0.0, sampler="euler_a", decoder=decoder)


def test_lcm_distilled_unet_matches_the_lcm_pipeline(tmp_path: Path) -> None:
    reference = with_lcm_unet(build_tiny_reference_pipeline("sd1"), time_cond_proj_dim=16)
    ours = load(saved(reference, tmp_path, LCM_SCHEDULER), device="cpu", dtype=torch.float32)
    assert ours.unet.config.time_cond_proj_dim == 16
    assert_matches(ours, reference, size=TINY_SIZE, steps=4, guidance_scale=8.0, sampler="lcm")


def test_sd15_with_the_lcm_scheduler_matches_diffusers(tiny_sd1_folder: Path) -> None:
    """The LCM-LoRA recipe minus the LoRA: SD 1.5's own scheduler file, LCMScheduler.from_config, guidance 1."""
    reference = build_tiny_reference_pipeline("sd1")
    reference.scheduler = LCMScheduler.from_config(SD15_SCHEDULER)
    ours = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    assert_matches(ours, reference, size=TINY_SIZE, steps=4, guidance_scale=1.0, sampler="lcm")


def test_sd_turbo_in_bfloat16_keeps_the_image(turbo) -> None:
    """The networks in bfloat16, the sampler's arithmetic in float32 (x̂0 = x̃ - σ·ε̂ at σ ≈ 14.6 in one step)."""
    fp32, folder = turbo[0], turbo[3]
    bf16 = load(folder / "model", device="cpu", dtype=torch.bfloat16, tiny_vae=folder / "taesd")
    options = dict(width=TINY_SIZE, height=TINY_SIZE, steps=1, guidance_scale=0.0, sampler="euler_a", seed=3)
    for decoder in ("full", "tiny"):
        a, b = (np.asarray(pipe.text_to_image(PROMPT, decoder=decoder, **options).images[0], dtype=np.float64)
                for pipe in (fp32, bf16))
        psnr = 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12))
        assert psnr > 25, (decoder, psnr)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_few_step_runs_one_unet_pass_per_step_and_one_prompt_encoding(turbo, guidance_scale: float) -> None:
    """Without guidance: no guidance batch, and the negative prompt is not encoded (it would be unused)."""
    ours = turbo[0]
    unet_batches, text_batches = [], []
    hooks = [
        ours.unet.register_forward_hook(lambda module, args, output: unet_batches.append(output.shape[0])),
        ours.text_encoder.register_forward_hook(lambda module, args, output: text_batches.append(args[0].shape[0])),
    ]
    try:
        # A prompt of its own: the pipeline keeps the states of the prompts it encoded before.
        ours.text_to_image(f"{PROMPT}, at guidance {guidance_scale}", "blurry", width=TINY_SIZE, height=TINY_SIZE,
                           steps=4, guidance_scale=guidance_scale, sampler="euler_a", seed=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert unet_batches == [1, 1, 1, 1]
    assert text_batches == [1]


# -------------------------------------------------------------------------- the Space's preloads
def preloaded_files() -> dict[str, set[str]]:
    """The README front matter's ``preload_from_hub``: repo id -> the files fetched at build time."""
    front_matter = (Path(__file__).parents[1] / "README.md").read_text().split("---\n")[1]
    entries = [entry.split() for entry in yaml.safe_load(front_matter)["preload_from_hub"]]
    return {repo: set(files.split(",")) for repo, files in entries}


@pytest.mark.parametrize(
    ("repo", "layout"),
    [("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5"),
     ("stabilityai/sd-turbo", "stable-diffusion-2-1-base")],  # SD-Turbo's repo has SD 2.1-base's layout
)
def test_the_space_preloads_what_load_reads(repo: str, layout: str) -> None:
    """Every small file ``load`` fetches from the repo, and the weights it picks for float32 and bfloat16."""
    files = preloaded_files()[repo]
    layout_files = {str(path.relative_to(HUB_LAYOUTS / layout)) for path in (HUB_LAYOUTS / layout).rglob("*") if path.is_file()}
    small = {file for file in layout_files if any(fnmatch.fnmatch(file, pattern) for pattern in hub._SMALL_FILES)}
    assert small <= files
    for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, ".fp16")):
        listed = files | {f"{sub}/{stem}{variant}.safetensors" for sub, stem, *_ in hub._COMPONENTS.values()
                          for variant in ("", ".fp16")}  # the repo holds both; the loader must pick a preloaded one
        for network, (sub, stem, *_) in hub._COMPONENTS.items():
            chosen = hub._choose_weight_file(listed, network, dtype=dtype, variant=None, allow_pickle=False)
            assert chosen == f"{sub}/{stem}{suffix}.safetensors" and chosen in files
    assert all(file.endswith((".json", ".txt", ".safetensors")) for file in files)


def test_the_space_preloads_the_tiny_autoencoder() -> None:
    assert preloaded_files()[hub.DEFAULT_TINY_VAE] == set(hub._TINY_VAE_FILES)


# ---------------------------------------------------------------------------- real shapes (slow)
def full_size_reference(repo: str) -> StableDiffusionPipeline:
    """diffusers' pipeline built from ``repo``'s real network configs, with random weights."""
    layout = HUB_LAYOUTS / repo
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(json.loads((layout / "unet" / "config.json").read_text())).eval(),
        vae=AutoencoderKL.from_config(json.loads((layout / "vae" / "config.json").read_text())).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(layout / "text_encoder")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(layout / "tokenizer"),
        scheduler=EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="class")
def scratch(tmp_path_factory: pytest.TempPathFactory):
    """A folder for GBs of weights, removed when the class's tests are done."""
    folder = tmp_path_factory.mktemp("full-size")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
class TestFullSizeSDTurbo:
    """SD 2.1-base's networks (SD-Turbo's architecture) and the real TAESD, random weights, 512²."""

    @pytest.fixture(scope="class")
    def models(self, scratch: Path):
        return turbo_models(full_size_reference("stable-diffusion-2-1-base"), lively(AutoencoderTiny()), scratch)

    @pytest.mark.parametrize("decoder", ["full", "tiny"])
    @pytest.mark.parametrize("steps", [1, 4])
    def test_fewstep_sd_turbo_matches_diffusers(self, models, steps: int, decoder: str) -> None:
        ours, reference, taesd, _ = models
        if decoder == "tiny":
            reference = StableDiffusionPipeline(**components(reference, vae=taesd))
        assert_matches(ours, reference, size=512, steps=steps, guidance_scale=0.0, sampler="euler_a", decoder=decoder)


@pytest.mark.slow
class TestFullSizeLCM:
    """SD 1.5's networks, random weights, 512²: with an LCM-distilled UNet (LCM_Dreamshaper_v7's
    guidance embedding of 256), and plain with the LCM sampler."""

    @pytest.fixture(scope="class")
    def sd15(self) -> StableDiffusionPipeline:
        return full_size_reference("stable-diffusion-v1-5")

    def test_fewstep_lcm_distilled_matches_the_lcm_pipeline(self, sd15, scratch: Path) -> None:
        reference = with_lcm_unet(sd15, time_cond_proj_dim=256)
        ours = load(saved(reference, scratch / "lcm", LCM_SCHEDULER), device="cpu", dtype=torch.float32)
        assert_matches(ours, reference, size=512, steps=4, guidance_scale=8.0, sampler="lcm")

    def test_fewstep_sd15_with_the_lcm_scheduler_matches_diffusers(self, sd15, scratch: Path) -> None:
        reference = StableDiffusionPipeline(**components(sd15, scheduler=LCMScheduler.from_config(SD15_SCHEDULER)))
        ours = load(saved(reference, scratch / "sd15", SD15_SCHEDULER), device="cpu", dtype=torch.float32)
        assert_matches(ours, reference, size=512, steps=4, guidance_scale=1.0, sampler="lcm")
