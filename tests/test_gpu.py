"""The GPU path: our networks and every generation door on CUDA, in float16 and bfloat16.

CI has no GPU, so these are skipped there, saying why; they run where CUDA is (``pytest
tests/test_gpu.py``, or ``benchmarks/gpu_check.sh`` on a lent machine, which also times the GPU).
``GPU_TEST_DEVICE=cpu`` runs them on the CPU, to check the tests themselves.

Half precision rounds differently on each GPU and in each library, so the networks are held to
what the reference reaches in the same precision: ours may stray from the float32 result on the CPU
at most twice as far as diffusers' and transformers' own classes do on the same device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_reference_pipeline
from stable_diffusion.hub import load
from test_lora import kohya_keys, random_lora, write
from test_pipelines import as_uint8, reference_images, reference_scheduler

DEVICE = torch.device(os.environ.get("GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (GPU_TEST_DEVICE=cpu checks these tests on the CPU)")
HALF = [torch.float16, torch.bfloat16]
SIZE = 32


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return ((value.float().cpu() - truth).abs().max() / truth.abs().max()).item()


@pytest.fixture(scope="module")
def reference():
    return build_tiny_reference_pipeline("sd1")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_networks_on_the_gpu_stray_no_further_than_the_reference(reference, tiny_sd1_folder: Path,
                                                                 dtype: torch.dtype) -> None:
    ours_cpu = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    ours = load(tiny_sd1_folder, device=DEVICE, dtype=dtype)
    assert ours.device.type == DEVICE.type and ours.dtype == dtype
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    ids = torch.tensor([ours.tokenizer("a red circle", padding="max_length", max_length=77).input_ids])
    t = torch.tensor([999.0, 21.5])
    on = dict(device=DEVICE, dtype=dtype)
    with torch.inference_mode():
        truth = {"unet": ours_cpu.unet(latents, t, context), "text": ours_cpu.text_encoder(ids),
                 "decode": ours_cpu.vae.decode(latents)}
        got = {"unet": ours.unet(latents.to(**on), t.to(DEVICE), context.to(**on)),
               "text": ours.text_encoder(ids.to(DEVICE)), "decode": ours.vae.decode(latents.to(**on))}
        net = reference.to(DEVICE, dtype)
        try:
            expected = {"unet": net.unet(latents.to(**on), t.to(DEVICE), encoder_hidden_states=context.to(**on)).sample,
                        "text": net.text_encoder(ids.to(DEVICE)).last_hidden_state,
                        "decode": net.vae.decode(latents.to(**on)).sample}
        finally:
            reference.to("cpu", torch.float32)
    for name in truth:
        assert got[name].device.type == DEVICE.type and got[name].dtype == dtype, name
        ours_error, reference_error = relative_error(got[name], truth[name]), relative_error(expected[name], truth[name])
        assert ours_error <= 2 * reference_error + 1e-3, (name, ours_error, reference_error)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a"])
def test_text_to_image_on_the_gpu_in_float16_matches_diffusers_there(reference, tiny_sd1_folder: Path,
                                                                      sampler: str) -> None:
    ours = load(tiny_sd1_folder, device=DEVICE, dtype=torch.float16)
    options = dict(prompt="a red circle on a blue background", negative_prompt="blurry", height=SIZE, width=SIZE,
                   num_inference_steps=8, guidance_scale=6.0)
    reference.scheduler = reference_scheduler(sampler, reference)
    cpu = reference_images(reference, generator=torch.Generator().manual_seed(7), **options)
    reference.to(DEVICE, torch.float16)
    try:
        expected = reference_images(reference, generator=torch.Generator().manual_seed(7), **options)
    finally:
        reference.to("cpu", torch.float32)
    result = ours.text_to_image(options["prompt"], options["negative_prompt"], width=SIZE, height=SIZE, steps=8,
                                guidance_scale=6.0, sampler=sampler, seed=7)
    got = as_uint8(result.images)
    # diffusers' own float16 image is this far from its float32 one; ours may be that far from it, or 2 levels.
    reference_drift = int(np.abs(expected - cpu).max())
    assert np.abs(got - expected).max() <= max(2, 2 * reference_drift), reference_drift


def test_every_door_runs_on_the_gpu(tiny_sd1_folder: Path, tmp_path: Path) -> None:
    """Image to image, inpainting, a LoRA tag, live previews and the inside views: no tensor left on another device."""
    write(tmp_path, "style", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=3,
                                                    alpha=lambda _: 0.5)))
    ours = load(tiny_sd1_folder, device=DEVICE, dtype=torch.float16, lora_dirs=[tmp_path])
    previews = []
    picture = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    runs = {
        "text": ours.text_to_image("a cat <lora:style:0.8>", width=SIZE, height=SIZE, steps=3, seed=1,
                                   callback=lambda step, total, x0: previews.append(ours.preview(x0)),
                                   trajectory=3, guidance_maps=2, attention_maps=True),
        "image": ours.image_to_image(picture, "a cat", strength=0.6, steps=4, seed=1, width=SIZE, height=SIZE),
        "inpaint": ours.inpaint(picture, mask, "a cat", steps=4, seed=1, paste_back=True, width=SIZE,
                               height=SIZE),
    }
    for name, result in runs.items():
        pixels = as_uint8(result.images)
        assert pixels.shape == (1, SIZE, SIZE, 3) and pixels.std() > 0, name
    assert len(previews) == 3 and previews[0][0].size[0] > 0
    assert runs["text"].attention_maps and runs["text"].trajectory and runs["text"].guidance_maps
    assert ours.loras == []  # the tag's LoRA is taken out again
