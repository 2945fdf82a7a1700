"""End-to-end checks of text-to-image and image-to-image against diffusers' pipelines.

The same tiny random weights, seeds and scheduler settings go through our pipeline and through
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``; the images must agree
to within 1/255 per pixel.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_picture, build_tiny_reference_pipeline
from stable_diffusion.hub import load
from stable_diffusion.images import native_area_size, save_png
from stable_diffusion.pipelines import GenerationCancelled

SIZE = 32  # pixels; the tiny VAE downsamples 2x, so 16x16 latents


@pytest.fixture(scope="module")
def reference():
    return build_tiny_reference_pipeline("sd1")


@pytest.fixture(scope="module")
def ours(tiny_sd1_folder):
    return load(tiny_sd1_folder, device="cpu", dtype=torch.float32)


def reference_scheduler(name: str, pipe):
    import diffusers

    # Built as diffusers' users build them: `<Scheduler>.from_config(the model's scheduler config)`.
    # Keys that config leaves out (SD 1.5's file has no timestep_spacing; diffusers remembers which
    # keys it filled in) take each class's own default, as ours do: "leading" for DDPM and DDIM,
    # "linspace" for Euler, Euler a and DPM-Solver.
    classes = {
        "ddpm": ("DDPMScheduler", {}),
        "ddim": ("DDIMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        "lcm": ("LCMScheduler", {}),
    }
    class_name, options = classes[name]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **options)


def as_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def reference_images(pipe, **kwargs) -> np.ndarray:
    out = pipe(output_type="np", **kwargs).images
    return (out * 255).round().astype(np.int16)


def test_a_short_plain_prompt_is_one_window_as_the_tokenizer_pads_it(ours):
    windows = ours._windows("a photo of a cat")
    assert len(windows) == 1 and len(windows[0].ids) == 77 and set(windows[0].weights) == {1.0}
    expected = ours.tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert list(windows[0].ids) == expected


def test_weighted_prompt_follows_the_original_emphasis_rule(ours):
    """A1111's "Original" emphasis: scale each token's hidden state by its weight, then restore the mean."""
    prompt = "a (red:1.5) cat on [a mat], (((looking up)))"
    # The rule divides by the window's mean. Real CLIP's final layer norm has a bias, so the mean
    # is far from 0; the random test model's is zero, and its mean (~1e-9) would be rounding noise.
    ours = dataclasses.replace(ours, text_encoder=copy.deepcopy(ours.text_encoder))
    torch.nn.init.uniform_(ours.text_encoder.final_layer_norm.bias, 0.2, 0.6)
    (window,) = ours._windows(prompt)
    with torch.inference_mode():
        plain = ours.text_encoder(torch.tensor([window.ids])).double()
    weights = torch.tensor(window.weights, dtype=torch.float64)[None, :, None]
    assert sorted(set(window.weights)) == pytest.approx([1 / 1.1, 1.0, 1.1**3, 1.5])
    expected = plain * weights * (plain.mean() / (plain * weights).mean())
    torch.testing.assert_close(ours.encode_prompt(prompt).double(), expected, rtol=1e-5, atol=1e-5)
    # The negative prompt too, and the generation runs with both weighted.
    result = ours.text_to_image(prompt, "(blurry:1.4)", width=SIZE, height=SIZE, steps=2, seed=1)
    assert result.parameters[0].startswith(prompt + "\nNegative prompt: (blurry:1.4)\n")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a"])
def test_text_to_image_matches_diffusers(reference, ours, sampler):
    reference.scheduler = reference_scheduler(sampler, reference)
    kwargs = dict(prompt="a red circle on a blue background", negative_prompt="blurry, green", height=SIZE, width=SIZE,
                  num_inference_steps=8, guidance_scale=6.0)
    expected = reference_images(reference, generator=[torch.Generator().manual_seed(42), torch.Generator().manual_seed(43)],
                                num_images_per_prompt=2, **kwargs)
    result = ours.text_to_image(kwargs["prompt"], kwargs["negative_prompt"], width=SIZE, height=SIZE, steps=8,
                                guidance_scale=6.0, sampler=sampler, seed=42, num_images=2)
    assert result.seeds == [42, 43]
    assert [image.size for image in result.images] == [(SIZE, SIZE)] * 2
    assert np.abs(as_uint8(result.images) - expected).max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_image_to_image_matches_diffusers(reference, ours, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = reference_scheduler(sampler, reference)
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    expected = reference_images(img2img, prompt="a square", negative_prompt="", image=start, strength=0.6,
                                num_inference_steps=10, guidance_scale=5.0, generator=[torch.Generator().manual_seed(7)])
    result = ours.image_to_image(start, "a square", strength=0.6, steps=10, guidance_scale=5.0, sampler=sampler, seed=7,
                                 width=SIZE, height=SIZE)
    assert np.abs(as_uint8(result.images) - expected).max() <= 1


def test_guidance_one_is_a_single_conditional_pass(reference, ours):
    reference.scheduler = reference_scheduler("ddim", reference)
    expected = reference_images(reference, prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=5,
                                guidance_scale=1.0, generator=[torch.Generator().manual_seed(3)])
    result = ours.text_to_image("a cat", width=SIZE, height=SIZE, steps=5, guidance_scale=1.0, sampler="ddim", seed=3)
    assert np.abs(as_uint8(result.images) - expected).max() <= 1


def test_a_prompt_is_encoded_once_until_the_text_encoders_weights_change(tiny_sd1_folder, tmp_path):
    from test_lora import kohya_keys, random_lora, write

    pipe = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    first = pipe.encode_prompt("a red circle")
    again = pipe.encode_prompt("a red circle")
    assert len(calls) == 1 and torch.equal(first, again) and first is not again
    pipe.text_to_image("a red circle", width=SIZE, height=SIZE, steps=2, seed=1)  # and its empty negative
    pipe.text_to_image("a red circle", width=SIZE, height=SIZE, steps=2, seed=2)
    assert len(calls) == 2  # the empty negative prompt's encoding
    # Another clip skip or window count is another entry.
    pipe.encode_prompt("a red circle", clip_skip=2)
    pipe.encode_prompt("a red circle", num_windows=2)
    assert len(calls) == 4

    # A LoRA merged into the text encoder, and taken out again: each state is its own.
    write(tmp_path, "style", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=3)))
    pipe.load_lora(tmp_path / "style.safetensors")
    merged = pipe.encode_prompt("a red circle")
    assert len(calls) == 5 and not torch.allclose(merged, first)
    pipe.unload_lora()
    assert torch.equal(pipe.encode_prompt("a red circle"), first) and len(calls) == 6
    # Weights loaded by hand (load_state_dict copies in place) are seen too.
    state = {name: torch.randn_like(value) for name, value in pipe.text_encoder.state_dict().items()}
    pipe.text_encoder.load_state_dict(state)
    assert not torch.allclose(pipe.encode_prompt("a red circle"), first) and len(calls) == 7


def test_only_the_last_prompts_states_are_kept(ours):
    from stable_diffusion.pipelines import _RecentPromptStates

    states = _RecentPromptStates()
    encoded = []
    for i in range(_RecentPromptStates.SIZE + 1):
        states.get(i, lambda i=i: encoded.append(i) or torch.full((1,), float(i)))
    states.get(_RecentPromptStates.SIZE, lambda: encoded.append("again") or torch.zeros(1))  # the newest: kept
    states.get(0, lambda: encoded.append("again") or torch.zeros(1))  # the oldest: dropped
    assert encoded[-2:] == [_RecentPromptStates.SIZE, "again"]


def test_same_seed_same_image_and_seed_i_is_seed_plus_i(ours):
    options = dict(width=SIZE, height=SIZE, steps=4, sampler="euler_a")
    first = ours.text_to_image("a cat", seed=11, num_images=2, **options)
    again = ours.text_to_image("a cat", seed=11, num_images=2, **options)
    alone = ours.text_to_image("a cat", seed=12, **options)
    assert np.array_equal(as_uint8(first.images), as_uint8(again.images))
    assert_same_picture(as_uint8(alone.images), as_uint8(first.images[1:]))
    assert not np.array_equal(as_uint8(first.images[:1]), as_uint8(first.images[1:]))
    drawn = ours.text_to_image("a cat", **options)
    assert isinstance(drawn.seeds[0], int) and f"Seed: {drawn.seeds[0]}" in drawn.parameters[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_and_thread_count_change_only_rounding(ours, threads):
    """The two kinds of numerical noise between machines: batched vs single kernels, and thread counts.

    Whatever this CPU's kernels do, the pictures stay within ``assert_same_picture``'s bound, the
    one the app and pipeline tests rely on when they compare a batch with a single image.
    """
    options = dict(width=48, height=40, steps=6, sampler="euler_a", guidance_scale=6.0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = ours.text_to_image("a cat on a mat", seed=21, num_images=2, **options).images
        torch.set_num_threads(threads)
        alone = ours.text_to_image("a cat on a mat", seed=22, **options).images
    finally:
        torch.set_num_threads(previous)
    assert_same_picture(as_uint8(alone), as_uint8(batch[1:]))


def test_long_prompts_are_encoded_in_windows(ours):
    long_prompt = ", ".join(["a very detailed painting of a lighthouse"] * 12)
    windows = ours._windows(long_prompt)
    assert len(windows) >= 2 and all(len(w.ids) == 77 for w in windows)
    context = ours.encode_prompt(long_prompt)
    assert context.shape == (1, 77 * len(windows), ours.text_encoder.config.hidden_size)
    first = torch.tensor([windows[0].ids])
    with torch.inference_mode():
        alone = ours.text_encoder(first)
    torch.testing.assert_close(context[:, :77], alone)
    # The negative prompt is padded to the same number of windows, and generation works.
    result = ours.text_to_image(long_prompt, "ugly", width=SIZE, height=SIZE, steps=2, seed=1)
    assert result.images[0].size == (SIZE, SIZE)


def test_callback_and_cancel(ours):
    seen = []
    ours.text_to_image("a cat", width=SIZE, height=SIZE, steps=5, sampler="euler", seed=0,
                       callback=lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    assert [s for s, _, _ in seen] == list(range(5)) and all(t == 5 for _, t, _ in seen)
    x0 = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    preview = ours.preview(x0)  # a small VAE: the exact decode
    assert ours.preview_decoder == "full"
    assert np.array_equal(np.asarray(preview[0]), np.asarray(ours.decode(x0)[0]))

    class StopAfterTwo:
        calls = 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls > 2

    with pytest.raises(GenerationCancelled):
        ours.text_to_image("a cat", width=SIZE, height=SIZE, steps=5, seed=0, cancel=StopAfterTwo())


def test_preview_of_a_large_vae_is_a_fitted_linear_map(ours, monkeypatch):
    import stable_diffusion.pipelines as pipelines

    monkeypatch.setattr(pipelines, "CHEAP_DECODE_PARAMETERS", 0)
    large = dataclasses.replace(ours)  # fits the map at construction, as a large VAE's pipeline does
    x0 = torch.randn(2, 4, SIZE // 2, SIZE // 2)
    previews = large.preview(x0)
    assert large.preview_decoder == "linear"
    assert [p.size for p in previews] == [(SIZE, SIZE)] * 2
    # RGB from the 4 latent channels, plus a bias.
    weight, bias = large._latent_rgb.weight, large._latent_rgb.bias
    assert weight.shape == (3, 4) and bias.shape == (3,)
    # Each preview pixel is the same affine function of its latent pixel, upscaled by nearest.
    rgb = weight @ (x0[0, :, 0, 0] / ours.vae.config.scaling_factor) + bias
    expected = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round()
    assert np.abs(np.asarray(previews[0])[0, 0].astype(int) - expected.numpy()).max() <= 1


def test_png_carries_parameters(ours, tmp_path):
    result = ours.text_to_image("a cat", "a dog", width=SIZE, height=SIZE, steps=3, guidance_scale=7.0,
                                sampler="dpmpp_2m_karras", seed=5)
    path = tmp_path / "out.png"
    save_png(result.images[0], path, result.parameters[0])
    text = Image.open(path).text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a cat" and lines[1] == "Negative prompt: a dog"
    assert lines[2].startswith("Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 32x32, Model: ")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=30), "multiple of 8"),
        (dict(width=4096, height=4096), "budget"),
        (dict(steps=0), "steps"),
        (dict(steps=5000), "steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=100.0), "guidance_scale"),
        (dict(sampler="plms"), "dpmpp_2m_karras"),
        (dict(num_images=0), "num_images"),
        (dict(num_images=100), "num_images"),
        (dict(seed=-5), "seed"),
        (dict(clip_skip=0), "clip_skip"),
    ],
)
def test_bad_text_to_image_input(ours, kwargs, message):
    options = dict(width=SIZE, height=SIZE, steps=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ours.text_to_image("a cat", **options)


def test_empty_prompt_is_an_unconditional_sample(reference, ours):
    """An empty prompt samples p(x) rather than p(x | c), as diffusers and the web UIs allow."""
    reference.scheduler = reference_scheduler("ddim", reference)
    expected = reference_images(reference, prompt="", height=SIZE, width=SIZE, num_inference_steps=5,
                                guidance_scale=7.5, generator=[torch.Generator().manual_seed(4)])
    result = ours.text_to_image("", width=SIZE, height=SIZE, steps=5, sampler="ddim", seed=4)
    assert np.abs(as_uint8(result.images) - expected).max() <= 1
    assert result.parameters[0].startswith("\nSteps: 5")


@pytest.mark.parametrize("prompt", [None, 42])
def test_a_prompt_that_is_not_text_is_rejected(ours, prompt):
    with pytest.raises(ValueError, match="prompt must be text"):
        ours.text_to_image(prompt, width=SIZE, height=SIZE, steps=2)


def test_huge_prompt_is_rejected(ours):
    with pytest.raises(ValueError, match="too long"):
        ours.text_to_image("cat " * 2000, width=SIZE, height=SIZE, steps=2)


def test_bad_image_to_image_input(ours):
    image = Image.new("RGB", (SIZE, SIZE))
    with pytest.raises(ValueError, match="image"):
        ours.image_to_image(None, "a cat", steps=2)
    with pytest.raises(ValueError, match="strength"):
        ours.image_to_image(image, "a cat", strength=0.0, steps=2)
    with pytest.raises(ValueError, match="strength"):
        ours.image_to_image(image, "a cat", strength=1.5, steps=2)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16", "CMYK"])
def test_image_modes_are_accepted(ours, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (SIZE + 5, SIZE + 3, 3), dtype=np.uint8))
    image = rgb.convert("RGBA").convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    result = ours.image_to_image(image, "a cat", strength=0.5, steps=2, seed=0)
    # Its aspect ratio at the model's native area (16² for this tiny model), in multiples of 8.
    assert result.images[0].size == native_area_size(image.size, ours.native_size) == (16, 16)


@pytest.mark.parametrize(
    ("size", "options", "expected"),
    [
        ((9000, 9000), {}, (16, 16)),  # a huge photo: the native area, not the pixel budget
        ((12, 40), {}, (8, 32)),  # a thin strip keeps its shape
        ((64, 32), {"width": 48}, (48, 24)),  # one side given: the other keeps the aspect ratio
        ((64, 32), {"height": 16}, (32, 16)),
        ((64, 32), {"width": 24, "height": 40}, (24, 40)),  # both given: as asked
    ],
)
def test_image_to_image_sizing_rule(ours, size, options, expected):
    result = ours.image_to_image(Image.new("RGB", size, "red"), "a cat", strength=0.5, steps=2, seed=0, **options)
    assert result.images[0].size == expected


def test_nan_output_is_a_clear_error(ours, monkeypatch):
    monkeypatch.setattr(ours.vae, "decode", lambda latents: torch.full((latents.shape[0], 3, SIZE, SIZE), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        ours.text_to_image("a cat", width=SIZE, height=SIZE, steps=2, seed=0)


def test_bfloat16_runs_close_to_float32(tiny_sd1_folder):
    fp32 = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    bf16 = load(tiny_sd1_folder, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    options = dict(width=SIZE, height=SIZE, steps=6, sampler="dpmpp_2m", seed=9)
    a = as_uint8(fp32.text_to_image("a cat", **options).images).astype(np.float64)
    b = as_uint8(bf16.text_to_image("a cat", **options).images).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr > 25, psnr
