"""The inside views: observers that record a run without changing it, their pictures, sampler paths.

What must hold: a run without observers takes the plain path and a run with them makes the same
images; the recorded data are what the run computed (checked against direct computations and
diffusers' schedulers); on the bundled tiny model the colour words' attention maps sit where the
words say (``benchmarks/score_attention.py`` has the full table).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from stable_diffusion import denoisers, inside, inside_pictures, layers, prompts, samplers
from stable_diffusion.hub import load
from stable_diffusion.request import InvalidSetting
from stable_diffusion.schedules import SchedulerConfig
from tiny_shapes.scoring import parse_caption

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import score_attention  # noqa: E402  (the localisation score, shared with the README's table)

TINY_SHAPES = ROOT / "models" / "tiny-shapes"
PROMPT = "a red circle on a blue background"
RUN = {"steps": 8, "guidance_scale": 4.0, "seed": 3, "num_images": 2}


@pytest.fixture(scope="module")
def shapes():
    return load(TINY_SHAPES, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return load(tiny_sd1_folder, device="cpu", dtype=torch.float32)


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


# ------------------------------------------------------------------------------------ the plain path
def test_a_run_without_observers_takes_the_plain_path(shapes, monkeypatch):
    """No observer, no probe: the sampler gets the guided denoiser itself and SDPA runs alone."""
    seen = {}
    plain_run = samplers.run

    def spy_run(plan, denoiser, x, **options):
        seen["denoiser"] = denoiser
        return plain_run(plan, denoiser, x, **options)

    def no_probe(*arguments):
        raise AssertionError("a plain run must not probe the attention")

    monkeypatch.setattr(samplers, "run", spy_run)
    monkeypatch.setattr(inside, "Observer", None)  # a plain run must not even build one
    monkeypatch.setattr(inside.AttentionCapture, "__call__", no_probe)
    result = shapes.text_to_image(PROMPT, **RUN)
    assert isinstance(seen["denoiser"], denoisers.GuidedDenoiser) and seen["denoiser"].observer is None
    assert layers._ATTENTION_PROBE.get() is None
    assert result.trajectory == [] and result.guidance_maps == [] and result.attention_maps == []


def test_observers_do_not_change_the_images(shapes):
    plain = shapes.text_to_image(PROMPT, **RUN)
    observed = shapes.text_to_image(PROMPT, **RUN, trajectory=3, guidance_maps=[0, -1], attention_maps=True)
    # Bit for bit: the observers only read tensors the run computes anyway.
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain.images), pixels(observed.images), strict=True))
    assert observed.seeds == plain.seeds and observed.parameters == plain.parameters


def test_the_probe_is_not_seen_by_other_threads():
    """A capture is installed for its own thread only, so a concurrent plain run never meets it."""
    torch.manual_seed(0)
    attention = layers.Attention(8, num_heads=2, head_dim=4, context_dim=6)
    x, context = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    capture = inside.AttentionCapture(1)
    with layers.attention_probe(capture):
        worker = threading.Thread(target=attention, args=(x, context))
        worker.start()
        worker.join()
        assert capture.sums == {}
        attention(x, context)
    assert list(capture.sums) == [attention]


# ------------------------------------------------------------------------------------ attention capture
@pytest.mark.parametrize("weighting", ["probability", "value"])
def test_capture_sums_the_conditional_halfs_probabilities(weighting):
    """Against softmax(q·kᵀ/√d) written out in full, per head, for the second (conditional) half of the batch."""
    torch.manual_seed(0)
    attention = layers.Attention(12, num_heads=3, head_dim=4, context_dim=10)
    x, context = torch.randn(4, 6, 12), torch.randn(4, 5, 10)  # [uncond, uncond, cond, cond]
    capture = inside.AttentionCapture(2, weighting=weighting)
    with torch.no_grad(), layers.attention_probe(capture):
        output = attention(x, context)
        attention(x, context)
    with torch.no_grad():
        assert torch.equal(output, attention(x, context))  # the probe only looks
        q = attention.to_q(x[2:]).view(2, 6, 3, 4).transpose(1, 2)
        k = attention.to_k(context[2:]).view(2, 5, 3, 4).transpose(1, 2)
        v = attention.to_v(context[2:]).view(2, 5, 3, 4).transpose(1, 2)
        probabilities = (q @ k.transpose(-1, -2) / 2.0).softmax(dim=-1)  # [B, heads, N, L]
        if weighting == "value":
            # Head h's share of the output for token j: W_o[:, h·4:(h+1)·4] · v_hj.
            norms = torch.stack(
                [(v[:, h] @ attention.to_out.weight[:, h * 4 : (h + 1) * 4].T).norm(dim=-1) for h in range(3)], dim=1
            )
            probabilities = probabilities * norms[:, :, None, :]
    torch.testing.assert_close(capture.sums[attention], 2 * probabilities.sum(dim=1), rtol=1e-5, atol=1e-6)


def test_self_attention_is_not_captured():
    attention = layers.Attention(8, num_heads=2, head_dim=4)
    capture = inside.AttentionCapture(1)
    with layers.attention_probe(capture):
        attention(torch.randn(1, 5, 8))
    assert capture.sums == {}


def test_attention_maps_per_token(sd1):
    """Non-square images: the maps have the image's size, lie in [0, 1], and name the prompt's own tokens."""
    result = sd1.text_to_image("a photo of a cat", width=48, height=32, steps=3, seed=0, num_images=2, attention_maps=True)
    assert len(result.attention_maps) == 2
    for maps in result.attention_maps:
        assert [text for text, _ in maps] == ["a", "photo", "of", "a", "cat"]
        for _, word_map in maps:
            assert word_map.shape == (32, 48) and word_map.dtype == np.float32
            assert word_map.min() >= 0 and word_map.max() == pytest.approx(1.0)
    assert not np.allclose(result.attention_maps[0][1][1], result.attention_maps[0][4][1])


def test_prompt_tokens_skip_bos_eos_and_padding_in_every_window(sd1):
    words = [f"word{i}" for i in range(40)]  # "wordN" is two tokens: 80 tokens, two windows
    prompt = "(red:1.3) " + " ".join(words)
    windows = prompts.token_windows(sd1.tokenizer, prompt, length=77)
    tokens = inside.prompt_tokens(sd1.tokenizer, windows)
    assert len(windows) == 2 and len(tokens) == sum(len(w.ids) - w.ids.count(sd1.tokenizer.eos_token_id) - 1 for w in windows)
    assert tokens[0] == inside.PromptToken(1, "red")
    assert [t.text for t in tokens[1:5]] == ["word", "0", "word", "1"]
    second = [t for t in tokens if t.position >= 77]
    assert second and second[0].position == 78  # after the second window's BOS
    assert all(windows[t.position // 77].ids[t.position % 77] not in (sd1.tokenizer.bos_token_id, sd1.tokenizer.eos_token_id)
               for t in tokens)


def test_an_empty_prompt_has_no_word_maps(shapes):
    result = shapes.text_to_image("", steps=2, seed=0, attention_maps=True)
    assert result.attention_maps == [[]]


# ------------------------------------------------------------------------------------ trajectory and guidance
def test_trajectory_records_the_chosen_steps(shapes):
    result = shapes.text_to_image(PROMPT, **RUN, trajectory=[0, 4, -1])
    plan = samplers.plan_sampling(shapes.scheduler, "dpmpp_2m_karras", 8)
    for image, snapshots in zip(result.images, result.trajectory, strict=True):
        assert [s.step for s in snapshots] == [0, 4, 7]
        assert [s.sigma for s in snapshots] == [float(plan.sigmas[i]) for i in (0, 4, 7)]
        assert all(s.noisy.size == s.denoised.size == image.size for s in snapshots)
        # DPM++ 2M's last step lands on its x̂0, and the small VAE previews exactly: the same picture.
        assert np.array_equal(np.asarray(snapshots[-1].denoised), np.asarray(image))
        assert not np.array_equal(np.asarray(snapshots[0].noisy), np.asarray(snapshots[-1].noisy))


def test_guidance_maps_only_with_guidance(shapes):
    guided = shapes.text_to_image(PROMPT, **RUN, guidance_maps=3)
    assert [[m.step for m in maps] for maps in guided.guidance_maps] == [[0, 4, 7]] * 2  # round(3.5) is 4
    for maps in guided.guidance_maps:
        assert all(m.difference.shape == (32, 32) and m.difference.min() >= 0 and m.difference.max() > 0 for m in maps)
    unguided = shapes.text_to_image(PROMPT, **{**RUN, "guidance_scale": 1.0}, guidance_maps=3)
    assert unguided.guidance_maps == [[], []]


def test_guidance_observer_sees_the_predicted_noise_of_both_halves():
    """ε̂ of each half, for ε- and v-prediction: x̃ = x̂0 + σ·ε̂ holds for each half's own output."""
    torch.manual_seed(0)
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def model(x, t, context):  # a toy network whose output depends on each item's own context
        return x * 0.3 + context.mean(dim=(1, 2))[:, None, None, None]

    for prediction_type in ("epsilon", "v_prediction"):
        denoiser = denoisers.Denoiser(model, alphas_cumprod, prediction_type)
        seen = []
        cond, uncond = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
        guided = denoisers.guided(denoiser, cond=cond, uncond=uncond, scale=3.0)
        observed = denoisers.GuidedDenoiser(denoiser, cond, uncond, 3.0, observer=lambda *a: seen.append(a))
        x, sigma = torch.randn(1, 4, 2, 2), 2.5
        assert torch.equal(observed(x, sigma), guided(x, sigma))
        (seen_sigma, eps_uncond, eps_cond), = seen
        assert seen_sigma == sigma
        for context, eps in ((uncond, eps_uncond), (cond, eps_cond)):
            torch.testing.assert_close(denoiser(x, sigma, context) + sigma * eps, x)


def test_image_to_image_records_its_own_steps(shapes):
    start = shapes.text_to_image("a white square on a black background", steps=6, seed=1).images[0]
    options = {"steps": 10, "strength": 0.5, "seed": 2, "guidance_scale": 3.0}
    plain = shapes.image_to_image(start, PROMPT, **options)
    observed = shapes.image_to_image(start, PROMPT, **options, trajectory=2, guidance_maps=[-1], attention_maps=True)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(observed.images[0]))
    assert [s.step for s in observed.trajectory[0]] == [0, 4]  # int(10 * 0.5) = 5 steps run
    assert [m.step for m in observed.guidance_maps[0]] == [4]
    assert [text for text, _ in observed.attention_maps[0]] == PROMPT.split()


@pytest.mark.parametrize(
    ("choice", "expected"), [(0, ()), (1, (0,)), (3, (0, 5, 10)), (50, tuple(range(11))), ([2, -1, 2], (2, 10))]
)
def test_chosen_steps(choice, expected):
    assert inside.chosen_steps(choice, 11, setting="trajectory") == expected


@pytest.mark.parametrize("choice", [-1, [11], [-12], "3", [1.5], True])
def test_bad_step_choices_name_the_setting(choice, shapes):
    with pytest.raises(InvalidSetting, match="trajectory"):
        inside.chosen_steps(choice, 11, setting="trajectory")
    with pytest.raises(InvalidSetting, match="guidance_maps"):
        shapes.text_to_image(PROMPT, steps=11, guidance_maps=choice if choice is not True else [99])


# ------------------------------------------------------------------------------------ localisation on the tiny model
# The default maps (value-weighted, every layer and step) on 6 captions x 2 seeds at 12 steps score
# 1.74 (object's colour), 0.76 (background's colour) and 1.17 (shape word on the outline); the
# floors leave room for other CPUs' rounding and catch maps that stop following the words.
LOCALISATION_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a white square on a green background",
    "a green circle on a purple background",
    "a blue triangle on a white background",
    "a black square on a yellow background",
]


def test_colour_words_sit_where_they_say_on_the_tiny_model(shapes):
    scores = []
    for prompt in LOCALISATION_PROMPTS:
        result = shapes.text_to_image(prompt, steps=12, guidance_scale=4.0, seed=0, num_images=2, attention_maps=True)
        scores += score_attention.score_images(result.images, result.attention_maps, parse_caption(prompt))
    assert len(scores) >= 10
    mean = {column: float(np.mean([s[column] for s in scores])) for column in ("color", "background", "shape outline")}
    assert mean["color"] > 1.4 and all(s["color"] > 1 for s in scores), mean
    assert mean["background"] < 0.9, mean
    assert mean["shape outline"] > 1.05, mean


# ------------------------------------------------------------------------------------ pictures
def test_heat_overlay_colours_the_hot_pixels():
    image = Image.new("RGB", (8, 4), (128, 128, 128))
    heat = np.zeros((2, 4), dtype=np.float32)
    heat[0, 0] = 1.0  # upsampled to the image's size
    overlay = np.asarray(inside_pictures.heat_overlay(image, heat), dtype=np.int16)
    assert overlay.shape == (4, 8, 3)
    assert np.abs(overlay[0, 0] - overlay[3, 7]).max() > 50


def test_strips_and_overlays(shapes):
    result = shapes.text_to_image(PROMPT, steps=6, seed=0, trajectory=4, guidance_maps=2, attention_maps=True)
    strip = inside_pictures.trajectory_strip(result.trajectory[0])
    cell = inside_pictures.MIN_CELL_SIDE  # the 32-px images are enlarged 4x
    assert strip.size == (inside_pictures._ROW_LABEL_WIDTH + 4 * cell, inside_pictures._LABEL_HEIGHT + 2 * cell)
    assert inside_pictures.guidance_strip(result.images[0], result.guidance_maps[0]).size[0] == inside_pictures._ROW_LABEL_WIDTH + 2 * cell
    overlays = inside_pictures.attention_overlays(result.images[0], result.attention_maps[0])
    assert [caption for _, caption in overlays] == PROMPT.split()
    assert all(overlay.size == result.images[0].size for overlay, _ in overlays)
    with pytest.raises(ValueError, match="trajectory"):
        inside_pictures.trajectory_strip([])
    with pytest.raises(ValueError, match="guidance"):
        inside_pictures.guidance_strip(result.images[0], [])


# ------------------------------------------------------------------------------------ sampler paths
@pytest.fixture(scope="module")
def sd15_scheduler() -> dict:
    path = ROOT / "tests" / "fixtures" / "hub-layouts" / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize(("sampler", "reference"), [("euler", "EulerDiscreteScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_sampler_paths_are_diffusers_schedules(sd15_scheduler, sampler, reference, steps):
    import diffusers

    config = SchedulerConfig.from_hub_config(sd15_scheduler)
    paths = {path.label: path for path in inside_pictures.sampler_paths(config, sampler, steps)}
    assert list(paths) == ["leading", "trailing", "linspace", "Karras σ's"]
    scheduler_class = getattr(diffusers, reference)
    for label, options in [*((s, {"timestep_spacing": s}) for s in ("leading", "trailing", "linspace")),
                           ("Karras σ's", {"use_karras_sigmas": True})]:
        scheduler = scheduler_class.from_config(sd15_scheduler, **options)
        scheduler.set_timesteps(steps)
        torch.testing.assert_close(paths[label].sigmas, scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(paths[label].timesteps.float(), scheduler.timesteps.float(), rtol=0, atol=1e-3)


def test_one_step_needs_trailing_spacing(sd15_scheduler):
    """Why a 1-step turbo model is run with "trailing": only it starts from pure noise at t = T - 1."""
    config = SchedulerConfig.from_hub_config(sd15_scheduler)
    first = {path.label: float(path.timesteps[0]) for path in inside_pictures.sampler_paths(config, "euler", 1)}
    assert first["trailing"] == 999 and first["leading"] == 1 and first["linspace"] == 0


def test_sampler_path_figure(sd15_scheduler):
    config = SchedulerConfig.from_hub_config(sd15_scheduler)
    paths = inside_pictures.sampler_paths(config, "ddim", 10)
    assert [path.label for path in paths] == ["leading", "trailing", "linspace"]  # DDIM has no Karras variant
    figure = inside_pictures.sampler_path_figure(config, paths, title="10 steps of DDIM")
    assert isinstance(figure, Figure)
    on_curve, by_step = figure.axes
    assert len(on_curve.collections) == 3 and len(by_step.lines) == 3
    assert [path.label for path in inside_pictures.sampler_paths(config, "lcm", 4)] == ["lcm"]
    with pytest.raises(ValueError, match="sampler"):
        inside_pictures.sampler_paths(config, "nope", 4)


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_sampler_path_figure_counts_whole_steps(sd15_scheduler, steps: int):
    config = SchedulerConfig.from_hub_config(sd15_scheduler)
    figure = inside_pictures.sampler_path_figure(config, inside_pictures.sampler_paths(config, "euler", steps))
    by_step = figure.axes[1]
    low, high = by_step.get_xlim()
    shown = [tick for tick in by_step.get_xticks() if low <= tick <= high]
    assert shown and all(float(tick).is_integer() for tick in shown), shown
    assert 1 in shown


def test_grid_of_every_unet_level():
    assert inside._grid_of(24 * 16, 16, 24) == (16, 24)
    assert inside._grid_of(12 * 8, 16, 24) == (8, 12)
    assert inside._grid_of(3 * 5, 5, 9) == (3, 5) and inside._grid_of(2 * 3, 5, 9) == (2, 3)  # stride 2 rounds up
    with pytest.raises(ValueError):
        inside._grid_of(7, 16, 24)
