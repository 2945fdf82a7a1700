"""Samplers, the denoiser and classifier-free guidance against diffusers' schedulers.

Each reference scheduler is built as its users build it, ``<Scheduler>.from_config(model's
scheduler config)``, from the same config dict our ``SchedulerConfig.from_hub_config`` reads: SD 1.5's
own file (no ``timestep_spacing``, so every class picks its default), or that file carrying an
explicit spacing as other models' files do (SD-Turbo's "trailing"). The reference loop drives it
exactly as StableDiffusionPipeline / StableDiffusionImg2ImgPipeline (and the LCM pipelines for
``LCMScheduler``) do, with a deterministic stand-in for the UNet (a smooth function of x, t and the
context), the same initial noise and the same generator for ancestral noise.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from stable_diffusion import denoisers, samplers, weights
from stable_diffusion.layers import guidance_scale_embedding
from stable_diffusion.schedules import SchedulerConfig, alphas_cumprod_from_config
from stable_diffusion.unet import UNet, UNetConfig

REFERENCES = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}
SHAPE = (1, 4, 8, 8)
IMG2IMG_STRENGTH = 0.75
# A1111's names for our samplers (its "LCM" sampler since v1.7).
WEB_UI_LABELS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "euler_karras": "Euler Karras",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lcm": "LCM",
}


def standin_model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A smooth, bounded function of x, t and the context, standing in for the UNet."""
    time = t.to(torch.float32).reshape(-1, 1, 1, 1) / 1000
    text = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (0.5 + 0.4 * time) + 0.1 * torch.sin(3 * x + 5 * time) + 0.2 * text


class RecordingModel:
    """The stand-in model, remembering the timesteps and contexts it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append((x, t, context))
        return standin_model(x, t, context)


@pytest.fixture(scope="module")
def sd15_scheduler_config(hub_layouts) -> dict:
    return json.loads((hub_layouts / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").read_text())


def model_config(sd15: dict, **keys) -> dict:
    """SD 1.5's scheduler config file with ``keys`` added, as another model's own file would carry them."""
    return {**sd15, **keys}


def reference_and_ours(sampler: str, hub_config: dict) -> tuple[object, SchedulerConfig]:
    """The reference scheduler exactly as ``from_config(model's config)`` builds it, and our reading of that config."""
    scheduler_class, options = REFERENCES[sampler]
    return scheduler_class.from_config(hub_config, **options), SchedulerConfig.from_hub_config(hub_config)


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def _strength(steps: int, img2img: bool) -> float | None:
    # One step needs strength 1 to run at all (int(1 * 0.75) = 0).
    return (IMG2IMG_STRENGTH if steps > 1 else 1.0) if img2img else None


def _reference_run(
    scheduler,
    steps: int,
    noise: torch.Tensor,
    *,
    context: torch.Tensor,
    generator,
    x0: torch.Tensor | None = None,
    strength: float | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    uncond: torch.Tensor | None = None,
    step_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """diffusers' SD pipeline loop: returns the timesteps run, the final latents and the x̂0's."""
    if isinstance(scheduler, LCMScheduler):
        # The LCM pipelines: strength shortens the distillation schedule, and every step runs.
        scheduler.set_timesteps(steps, strength=1.0 if strength is None else strength)
        timesteps = scheduler.timesteps
    else:
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        if strength is not None:
            init_timestep = min(int(steps * strength), steps)
            t_start = max(steps - init_timestep, 0)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
    if strength is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    do_cfg = guidance_scale > 1
    x0_hats = []
    for t in timesteps:
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        output = standin_model(model_input, t, torch.cat([uncond, context]) if do_cfg else context)
        if do_cfg:
            output_uncond, output_text = output.chunk(2)
            output = output_uncond + guidance_scale * (output_text - output_uncond)
            if guidance_rescale > 0:
                output = rescale_noise_cfg(output, output_text, guidance_rescale=guidance_rescale)
        step = scheduler.step(output, t, latents, generator=generator, **(step_kwargs or {}))
        latents = step.prev_sample
        # LCM reports its consistency estimate f as `denoised`, the others x̂0 (if at all).
        x0_hats.append(getattr(step, "denoised", getattr(step, "pred_original_sample", None)))
    return timesteps, latents, x0_hats


def _our_run(
    config: SchedulerConfig,
    sampler: str,
    steps: int,
    noise: torch.Tensor,
    *,
    context: torch.Tensor,
    generator,
    x0: torch.Tensor | None = None,
    strength: float | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    uncond: torch.Tensor | None = None,
    eta: float = 0.0,
    model=standin_model,
) -> tuple[samplers.SamplingPlan, torch.Tensor, list[torch.Tensor]]:
    plan = samplers.plan_sampling(config, sampler, steps, strength=strength or 1.0, eta=eta)
    x = samplers.initial_latents(plan, noise) if strength is None else samplers.noised_latents(plan, x0, noise)
    denoiser = denoisers.Denoiser(model, alphas_cumprod_from_config(config), config.prediction_type)
    guided = denoisers.guided(
        denoiser, context, context if uncond is None else uncond, guidance_scale, rescale=guidance_rescale
    )
    x0_hats = []

    def record(step: int, total: int, x0_hat: torch.Tensor) -> None:
        assert (step, total) == (len(x0_hats), plan.num_steps)
        x0_hats.append(x0_hat)

    return plan, samplers.run(plan, guided, x, generator=generator, callback=record), x0_hats


def _check_plan(plan: samplers.SamplingPlan, scheduler, timesteps: torch.Tensor) -> None:
    """Our timesteps and σ's are the reference's (σ's: up to its float32 ᾱ)."""
    assert plan.timesteps.dtype == timesteps.dtype
    torch.testing.assert_close(plan.timesteps, timesteps, atol=1e-3, rtol=0)
    start = len(scheduler.timesteps) - len(timesteps)
    if isinstance(scheduler, (DDPMScheduler, DDIMScheduler, LCMScheduler)):
        alphas_cumprod = scheduler.alphas_cumprod[timesteps]
        final = scheduler.final_alpha_cumprod if isinstance(scheduler, DDIMScheduler) else torch.tensor(1.0)
        alphas_cumprod = torch.cat([alphas_cumprod, final.reshape(1)])
        reference_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    else:
        reference_sigmas = scheduler.sigmas[start:]
    torch.testing.assert_close(plan.sigmas, reference_sigmas, rtol=5e-5, atol=0)


# None: the model's config leaves timestep_spacing out (SD 1.5's), so each class uses its default.
PARITY_CASES = [
    (sampler, spacing)
    for sampler in samplers.SAMPLER_NAMES
    if sampler != "lcm"  # LCM has no spacing: test_lcm_matches_diffusers
    for spacing in (None, "leading", "trailing", "linspace")
    # diffusers' DDIM mis-steps with linspace spacing (issue #12633); ours follows the plan.
    if not (sampler == "ddim" and spacing == "linspace")
]


def _check_parity(
    scheduler, config: SchedulerConfig, sampler: str, steps: int, *, img2img: bool, strength: float | None
) -> samplers.SamplingPlan:
    """Runs the reference and ours on the same noise, seeds and context; checks plan, latents and x̂0's."""
    context = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) if img2img else None
    # One generator per run for the initial noise and then the ancestral noise, as the pipelines use it.
    reference_generator = torch.Generator().manual_seed(3)
    reference_noise = torch.randn(SHAPE, generator=reference_generator)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(SHAPE, generator=generator)

    timesteps, expected, expected_x0_hats = _reference_run(
        scheduler, steps, reference_noise, context=context, generator=reference_generator, x0=x0, strength=strength
    )
    plan, latents, x0_hats = _our_run(
        config, sampler, steps, noise, context=context, generator=generator, x0=x0, strength=strength
    )

    _check_plan(plan, scheduler, timesteps)
    if not img2img:
        reference_scale = float(scheduler.init_noise_sigma)
        if isinstance(scheduler, (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler)):
            # These start at x_T ~ N(0, I) in the network's space: x̃ = x_T·√(1+σ²).
            reference_scale *= (1 + float(plan.sigmas[0]) ** 2) ** 0.5
        assert plan.init_noise_scale == pytest.approx(reference_scale, rel=1e-6)
    assert _relative_error(latents, expected) < 1e-5
    assert len(x0_hats) == len(timesteps)
    for ours, reference in zip(x0_hats, expected_x0_hats, strict=True):
        if reference is not None:
            assert _relative_error(ours, reference) < 1e-5
    return plan


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 4, 10, 25, 50])
@pytest.mark.parametrize(("sampler", "spacing"), PARITY_CASES)
def test_sampler_matches_diffusers(
    sd15_scheduler_config: dict, sampler: str, spacing: str | None, steps: int, prediction_type: str, img2img: bool
) -> None:
    keys = {"prediction_type": prediction_type} | ({} if spacing is None else {"timestep_spacing": spacing})
    scheduler, config = reference_and_ours(sampler, model_config(sd15_scheduler_config, **keys))
    _check_parity(scheduler, config, sampler, steps, img2img=img2img, strength=_strength(steps, img2img))


def test_sd15_config_spacing_is_each_reference_classes_default(sd15_scheduler_config: dict) -> None:
    """Issue #13: Euler from SD 1.5's own config starts at σ_max (14.6), not at σ(t=831) = 5.9."""
    assert "timestep_spacing" not in sd15_scheduler_config
    config = SchedulerConfig.from_hub_config(sd15_scheduler_config)
    assert config.timestep_spacing is None

    euler = samplers.plan_sampling(config, "euler", 6)
    assert float(euler.sigmas[0]) == pytest.approx(14.6146, rel=1e-4) and float(euler.timesteps[0]) == 999
    ddim = samplers.plan_sampling(config, "ddim", 6)
    assert ddim.timesteps.tolist() == [831, 665, 499, 333, 167, 1]  # leading, with SD's steps_offset 1
    for sampler in ("euler_a", "dpmpp_2m"):
        assert int(samplers.plan_sampling(config, sampler, 6).timesteps[0]) == 999
    # The same config with an explicit spacing is honoured by every sampler.
    leading = SchedulerConfig.from_hub_config(model_config(sd15_scheduler_config, timestep_spacing="leading"))
    assert float(samplers.plan_sampling(leading, "euler", 6).timesteps[0]) == 831


LCM_CONFIGS = {
    # SD 1.5 with the LCM-LoRA: LCMScheduler.from_config(SD 1.5's file) takes the class's LCM defaults.
    "sd15": {},
    # An LCM-distilled model's own LCMScheduler file (LCM_Dreamshaper_v7 style).
    "distilled": {
        "_class_name": "LCMScheduler",
        "original_inference_steps": 50,
        "timestep_scaling": 10.0,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
    },
    # Other values, to show that both LCM keys are read.
    "custom": {"original_inference_steps": 40, "timestep_scaling": 4.0},
}


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("lcm_config", list(LCM_CONFIGS))
def test_lcm_matches_diffusers(
    sd15_scheduler_config: dict, lcm_config: str, steps: int, prediction_type: str, img2img: bool
) -> None:
    hub_config = model_config(sd15_scheduler_config, prediction_type=prediction_type, **LCM_CONFIGS[lcm_config])
    scheduler, config = reference_and_ours("lcm", hub_config)
    plan = _check_parity(scheduler, config, "lcm", steps, img2img=img2img, strength=0.5 if img2img else None)
    # Every step runs, img2img included; c_skip ≈ 0 and c_out ≈ 1 except near t = 0.
    assert plan.num_steps == steps
    scalings = scheduler.get_scalings_for_boundary_condition_discrete
    expected = torch.tensor([[float(c) for c in scalings(t)] for t in plan.timesteps])
    torch.testing.assert_close(torch.tensor([plan.options["c_skip"], plan.options["c_out"]]).T, expected)


def test_lcm_distilled_unet_runs_as_the_lcm_pipeline_runs_it(sd15_scheduler_config: dict) -> None:
    """The recipe for UNets with ``time_cond_proj_dim``: timestep_cond = the embedding of w = guidance_scale - 1,
    and no guidance batch (scale 1 in the wrapper). With the lcm sampler it is LatentConsistencyModelPipeline."""
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    unet_config = dataclasses.replace(UNetConfig.tiny(), time_cond_proj_dim=16)
    torch.manual_seed(0)
    reference_unet = UNet2DConditionModel.from_config(unet_config.to_hub_config()).eval()
    unet = weights.build_on_meta(UNet, unet_config)
    unet = weights.load_into(unet, weights.hub_to_ours("unet", reference_unet.state_dict())).eval()
    scheduler, config = reference_and_ours("lcm", model_config(sd15_scheduler_config, **LCM_CONFIGS["distilled"]))
    guidance_scale, steps, shape = 8.5, 4, (2, 4, 8, 8)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (21, 22)]

    with torch.no_grad():
        # LatentConsistencyModelPipeline.__call__, steps 5-8.
        reference_generators = generators()
        latents = samplers.draw_noise(shape, generator=reference_generators) * scheduler.init_noise_sigma
        w = torch.tensor(guidance_scale - 1).repeat(shape[0])
        w_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            output = reference_unet(latents, t, timestep_cond=w_embedding, encoder_hidden_states=context).sample
            latents, expected = scheduler.step(output, t, latents, generator=reference_generators, return_dict=False)

        ours = generators()
        timestep_cond = guidance_scale_embedding(torch.tensor([guidance_scale - 1]), unet_config.time_cond_proj_dim)
        batches = []

        def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            batches.append(x.shape[0])
            return unet(x, t, c, timestep_cond=timestep_cond)

        denoiser = denoisers.Denoiser(model, alphas_cumprod_from_config(config), config.prediction_type)
        plan = samplers.plan_sampling(config, "lcm", steps)
        x = samplers.initial_latents(plan, samplers.draw_noise(shape, generator=ours))
        no_guidance_batch = denoisers.guided(denoiser, context, torch.zeros_like(context), 1.0)
        latents = samplers.run(plan, no_guidance_batch, x, generator=ours)

    assert batches == [shape[0]] * steps
    assert _relative_error(latents, expected) < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_with_eta_matches_diffusers(sd15_scheduler_config: dict, steps: int, spacing: str) -> None:
    scheduler, config = reference_and_ours("ddim", model_config(sd15_scheduler_config, timestep_spacing=spacing))
    context = torch.randn(1, 77, 16)
    noise = torch.randn(SHAPE)

    _, expected, _ = _reference_run(
        scheduler, steps, noise, context=context, generator=torch.Generator().manual_seed(5), step_kwargs={"eta": 0.5}
    )
    _, latents, _ = _our_run(
        config, "ddim", steps, noise, context=context, generator=torch.Generator().manual_seed(5), eta=0.5
    )

    assert _relative_error(latents, expected) < 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "lcm"])
def test_one_generator_per_image(sd15_scheduler_config: dict, sampler: str) -> None:
    """Image i's noise comes from generator i alone, as with diffusers' lists of generators."""
    scheduler, config = reference_and_ours(sampler, sd15_scheduler_config)
    shape = (2, *SHAPE[1:])
    context = torch.randn(2, 77, 16)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (11, 12)]

    reference_generators = generators()
    reference_noise = torch.cat([torch.randn(1, *shape[1:], generator=g) for g in reference_generators])
    ours = generators()
    noise = samplers.draw_noise(shape, generator=ours)
    torch.testing.assert_close(noise, reference_noise, rtol=0, atol=0)

    _, expected, _ = _reference_run(scheduler, 10, reference_noise, context=context, generator=reference_generators)
    _, latents, _ = _our_run(config, sampler, 10, noise, context=context, generator=ours)
    assert _relative_error(latents, expected) < 1e-5

    # Item 1 alone, with its own generator, comes out the same as in the batch.
    single = [torch.Generator().manual_seed(12)]
    _, alone, _ = _our_run(
        config,
        sampler,
        10,
        samplers.draw_noise((1, *shape[1:]), generator=single),
        context=context[1:],
        generator=single,
    )
    torch.testing.assert_close(alone, latents[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [10, 25])
def test_zero_terminal_snr_matches_diffusers(sd15_scheduler_config: dict, sampler: str, steps: int) -> None:
    settings = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    scheduler, config = reference_and_ours(sampler, model_config(sd15_scheduler_config, **settings))
    context = torch.randn(1, 77, 16)
    noise = torch.randn(SHAPE)

    timesteps, expected, _ = _reference_run(scheduler, steps, noise, context=context, generator=torch.Generator())
    plan, latents, _ = _our_run(config, sampler, steps, noise, context=context, generator=torch.Generator())

    assert float(plan.sigmas[0]) == pytest.approx(4096, rel=1e-3)
    _check_plan(plan, scheduler, timesteps)
    # The first step starts at σ = 4096, where x̃ = x_0 + σ·ε holds the data 4096 times below the
    # noise: float32's rounding of x̃ (2^-24 relative) is σ·2^-24 ≈ 2.4e-4 of the data's scale, and
    # the two implementations order those operations differently (diffusers scales x_t, we x̃).
    # Seen: 1.2e-6 on an Intel Xeon, 2.6e-5 on an AMD EPYC; the bound is that rounding, not a guess.
    assert _relative_error(latents, expected) < 4096 * 2**-24


@pytest.mark.parametrize(("sampler", "prediction_type"), [("euler", "v_prediction"), ("dpmpp_2m_karras", "epsilon")])
def test_classifier_free_guidance_matches_the_pipeline(
    sd15_scheduler_config: dict, sampler: str, prediction_type: str
) -> None:
    scheduler, config = reference_and_ours(
        sampler, model_config(sd15_scheduler_config, prediction_type=prediction_type)
    )
    shape = (2, *SHAPE[1:])
    cond, uncond = torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    noise = torch.randn(shape)
    cfg = {"guidance_scale": 7.5, "guidance_rescale": 0.7, "uncond": uncond}

    _, expected, _ = _reference_run(scheduler, 10, noise, context=cond, generator=None, **cfg)
    _, latents, _ = _our_run(config, sampler, 10, noise, context=cond, generator=None, **cfg)

    assert _relative_error(latents, expected) < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_is_one_batched_call_applying_the_formula(prediction_type: str) -> None:
    model = RecordingModel()
    denoiser = denoisers.Denoiser(model, alphas_cumprod_from_config(SchedulerConfig()), prediction_type)
    x, cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    sigma, scale = 3.0, 6.0

    guided = denoisers.guided(denoiser, cond, uncond, scale)(x, sigma)

    assert len(model.calls) == 1
    batched_x, _, context = model.calls[0]
    assert batched_x.shape[0] == 4 and torch.equal(context, torch.cat([uncond, cond]))
    output_cond = denoiser.model_output(x, sigma, cond)
    output_uncond = denoiser.model_output(x, sigma, uncond)
    expected = denoiser.denoised(x, sigma, output_uncond + scale * (output_cond - output_uncond))
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    # The guidance is linear in the output, so it is the same on x̂0.
    x0_cond, x0_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
    torch.testing.assert_close(guided, x0_uncond + scale * (x0_cond - x0_uncond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_guidance_at_most_one_is_the_plain_conditional_denoiser(scale: float) -> None:
    """diffusers: do_classifier_free_guidance = guidance_scale > 1; SD-Turbo's guidance 0 follows the prompt."""
    model = RecordingModel()
    denoiser = denoisers.Denoiser(model, alphas_cumprod_from_config(SchedulerConfig()), "epsilon")
    x, cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16), torch.randn(2, 77, 16)

    guided = denoisers.guided(denoiser, cond, uncond, scale, rescale=0.7)(x, 3.0)

    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 2 and torch.equal(model.calls[0][2], cond)
    torch.testing.assert_close(guided, denoiser(x, 3.0, cond), rtol=0, atol=0)


@pytest.mark.parametrize(("sampler", "scale"), [("euler", 0.0), ("dpmpp_2m", 0.5), ("lcm", 1.0), ("euler_a", 0.0)])
def test_guidance_at_most_one_matches_the_pipeline(sd15_scheduler_config: dict, sampler: str, scale: float) -> None:
    """One conditional pass per step, whatever the negative prompt, as diffusers' pipelines run it."""
    scheduler, config = reference_and_ours(sampler, sd15_scheduler_config)
    cond, uncond = torch.randn(1, 77, 16), torch.randn(1, 77, 16)
    noise = torch.randn(SHAPE)
    model = RecordingModel()
    cfg = {"guidance_scale": scale, "uncond": uncond}

    reference_generator = torch.Generator().manual_seed(4)
    _, expected, _ = _reference_run(scheduler, 6, noise, context=cond, generator=reference_generator, **cfg)
    plan, latents, _ = _our_run(
        config, sampler, 6, noise, context=cond, generator=torch.Generator().manual_seed(4), model=model, **cfg
    )

    assert _relative_error(latents, expected) < 1e-5
    assert len(model.calls) == plan.num_steps
    assert all(x.shape[0] == 1 and torch.equal(context, cond) for x, _, context in model.calls)


def test_guidance_rescale_matches_diffusers() -> None:
    guided_output, cond_output = 3 * torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(
            denoisers.rescale_guidance(guided_output, cond_output, phi),
            rescale_noise_cfg(guided_output, cond_output, guidance_rescale=phi),
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_eps_helpers_match_ddim(prediction_type: str) -> None:
    scheduler = DDIMScheduler.from_config(SchedulerConfig(prediction_type=prediction_type).to_hub_config())
    scheduler.set_timesteps(10)
    x_t, output = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(scheduler.timesteps[3])
    alpha_cumprod = scheduler.alphas_cumprod[t]

    x0 = denoisers.predict_x0(output, x_t, alpha_cumprod, prediction_type=prediction_type)
    eps = denoisers.predict_eps(output, x_t, alpha_cumprod, prediction_type=prediction_type)

    torch.testing.assert_close(x0, scheduler.step(output, t, x_t).pred_original_sample)
    # Together they rebuild x_t = √ᾱ·x̂0 + √(1-ᾱ)·ε̂ (Ho et al. 2020, eq. 4).
    torch.testing.assert_close(alpha_cumprod**0.5 * x0 + (1 - alpha_cumprod) ** 0.5 * eps, x_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("sampler", "integer"), [("dpmpp_2m_karras", True), ("euler_karras", False)])
def test_the_network_sees_the_plans_timesteps(sampler: str, integer: bool) -> None:
    config = SchedulerConfig()
    model = RecordingModel()
    denoiser = denoisers.Denoiser(model, alphas_cumprod_from_config(config), "epsilon")
    plan = samplers.plan_sampling(config, sampler, 12)

    samplers.run(
        plan, denoisers.guided(denoiser, torch.zeros(1, 77, 16), torch.zeros(1, 77, 16), 1.0), torch.randn(SHAPE)
    )

    seen = torch.stack([t[0] for _, t, _ in model.calls])
    assert plan.round_timesteps is integer
    assert torch.equal(seen, seen.round()) is integer
    torch.testing.assert_close(seen, plan.timesteps.float(), atol=1e-3, rtol=0)


def test_runs_share_no_state() -> None:
    """One plan and one denoiser serve interleaved requests: each run depends only on its inputs."""
    config = SchedulerConfig()
    plan = samplers.plan_sampling(config, "dpmpp_2m", 8)
    denoiser = denoisers.Denoiser(standin_model, alphas_cumprod_from_config(config), "epsilon")
    context = torch.randn(1, 77, 16)
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    first = samplers.run(plan, denoisers.guided(denoiser, context, context, 1.0), a)

    def interleave(step: int, total: int, x0_hat: torch.Tensor) -> None:
        samplers.run(plan, denoisers.guided(denoiser, -context, context, 5.0), b)

    again = samplers.run(plan, denoisers.guided(denoiser, context, context, 1.0), a, callback=interleave)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_registry_lists_every_sampler_with_its_web_ui_label_and_a_description() -> None:
    assert samplers.SAMPLER_NAMES == tuple(WEB_UI_LABELS)
    assert {name: spec.label for name, spec in samplers.SAMPLERS.items()} == WEB_UI_LABELS
    for spec in samplers.SAMPLERS.values():
        assert spec.description and spec.sample.__doc__


def test_img2img_plan_is_the_tail_of_the_full_plan() -> None:
    config = SchedulerConfig()
    full = samplers.plan_sampling(config, "euler", 20)
    tail = samplers.plan_sampling(config, "euler", 20, strength=0.5)

    assert tail.num_steps == 10
    assert torch.equal(tail.sigmas, full.sigmas[10:]) and torch.equal(tail.timesteps, full.timesteps[10:])
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(samplers.noised_latents(tail, x0, noise), x0 + float(full.sigmas[10]) * noise)


BAD_PLANS: list[tuple[dict, str]] = [
    ({"steps": 0}, "from 1 to 1000"),
    ({"steps": 1001}, "from 1 to 1000"),
    ({"steps": 2.5}, "integer from 1 to 1000"),
    ({"steps": True}, "integer from 1 to 1000"),
    ({"strength": 0.0}, r"\(0, 1\]"),
    ({"strength": -0.2}, r"\(0, 1\]"),
    ({"strength": 1.5}, r"\(0, 1\]"),
    ({"strength": 0.05}, "strength of at least 0.1"),
    ({"sampler": "heun"}, "ddpm, ddim, euler, euler_a, euler_karras, dpmpp_2m, dpmpp_2m_karras, lcm"),
    ({"sampler": "euler", "eta": 0.5}, "ddim sampler only"),
    ({"sampler": "ddim", "eta": -1.0}, "at least 0"),
    ({"sampler": "ddim", "steps": 1000}, "past the last training timestep"),
    ({"sampler": "lcm", "steps": 51}, "at most 50 steps"),
    ({"sampler": "lcm", "steps": 4, "strength": 0.05}, "at most 2 steps or a higher strength"),
]


@pytest.mark.parametrize(("change", "message"), BAD_PLANS)
def test_bad_requests_raise_value_errors_naming_the_valid_choices(change: dict, message: str) -> None:
    arguments = {"sampler": "euler", "steps": 10, **change}
    options = {key: arguments.pop(key) for key in ("strength", "eta") if key in arguments}
    with pytest.raises(ValueError, match=message):
        samplers.plan_sampling(SchedulerConfig(), arguments["sampler"], arguments["steps"], **options)


def test_bad_denoiser_arguments_raise_value_errors() -> None:
    config = SchedulerConfig(rescale_betas_zero_snr=True)
    denoiser = denoisers.Denoiser(standin_model, alphas_cumprod_from_config(config), "epsilon")
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        denoisers.Denoiser(standin_model, alphas_cumprod_from_config(config), "sample")
    with pytest.raises(ValueError, match="alphas_cumprod_from_config"):
        denoisers.Denoiser(standin_model, torch.tensor([0.9, 0.5, 0.0]), "epsilon")
    with pytest.raises(ValueError, match="same shape"):
        denoisers.guided(denoiser, torch.zeros(1, 77, 16), torch.zeros(1, 77, 8), 7.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        denoisers.guided(denoiser, torch.zeros(1, 77, 16), torch.zeros(1, 77, 16), 7.5, rescale=1.5)
    with pytest.raises(ValueError, match="one per batch item"):
        samplers.draw_noise((3, 4, 8, 8), generator=[torch.Generator(), torch.Generator()])
    guided = denoisers.guided(denoiser, torch.zeros(1, 77, 16), torch.zeros(1, 77, 16), 1.0)
    with pytest.raises(ValueError, match="one value per step"):
        samplers.sample_lcm(guided, torch.zeros(SHAPE), torch.tensor([2.0, 1.0, 0.0]), c_skip=[0.0], c_out=[1.0, 1.0])
