"""Noise schedules against diffusers' schedulers (their float32 arithmetic vs our float64)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LCMScheduler

from stable_diffusion import schedules
from stable_diffusion.schedules import SchedulerConfig

HUB_SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def _reference(schedule: str, *, zero_snr: bool = False) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=HUB_SCHEDULE_NAMES[schedule],
        rescale_betas_zero_snr=zero_snr,
    )


def _load(hub_layouts, repo: str) -> dict:
    return json.loads((hub_layouts / repo / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", schedules.BETA_SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(schedule: str, zero_snr: bool) -> None:
    reference = _reference(schedule, zero_snr=zero_snr)
    betas = schedules.make_betas(schedule, 1000, beta_start=0.00085, beta_end=0.012)
    if zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    alphas_cumprod = schedules.alphas_cumprod(betas)

    assert betas.dtype == alphas_cumprod.dtype == torch.float32
    assert (betas - reference.betas).abs().max() < 1e-5
    assert (alphas_cumprod - reference.alphas_cumprod).abs().max() < 1e-6


def test_zero_terminal_snr_keeps_the_first_step_and_ends_at_zero() -> None:
    betas = schedules.make_betas("scaled_linear")
    rescaled = schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(betas))
    original = schedules.alphas_cumprod(betas)

    assert rescaled[-1] == 0
    assert torch.isclose(rescaled[0], original[0], rtol=1e-6)
    assert schedules.sigmas_from_alphas_cumprod(rescaled)[-1] == float("inf")
    assert (rescaled[1:] < rescaled[:-1]).all()


def test_alphas_cumprod_from_config_keeps_sigma_finite() -> None:
    config = SchedulerConfig(rescale_betas_zero_snr=True)
    alphas_cumprod = schedules.alphas_cumprod_from_config(config)
    reference = EulerDiscreteScheduler.from_config(config.to_hub_config())

    assert alphas_cumprod[-1] == 2.0**-24
    assert (alphas_cumprod - reference.alphas_cumprod).abs().max() < 1e-6
    assert torch.isfinite(schedules.sigmas_from_alphas_cumprod(alphas_cumprod)).all()


def test_sigmas_snr_and_log_snr_are_consistent() -> None:
    alphas_cumprod = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))
    reference = _reference("scaled_linear")
    sigmas = schedules.sigmas_from_alphas_cumprod(alphas_cumprod)
    reference_sigmas = ((1 - reference.alphas_cumprod) / reference.alphas_cumprod) ** 0.5

    # diffusers forms 1 - ᾱ in float32, which costs ~1e-5 relative at t = 0 (ᾱ ≈ 0.99915).
    torch.testing.assert_close(sigmas, reference_sigmas, rtol=5e-5, atol=0)
    torch.testing.assert_close(
        schedules.snr(alphas_cumprod), sigmas.double() ** -2, rtol=1e-5, atol=0, check_dtype=False
    )
    torch.testing.assert_close(schedules.log_snr(alphas_cumprod), -2 * sigmas.log(), rtol=1e-5, atol=1e-6)
    assert (sigmas[1:] > sigmas[:-1]).all()


def test_q_sample_matches_add_noise() -> None:
    reference = _reference("scaled_linear")
    alphas_cumprod = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])

    noisy = schedules.q_sample(x0, t, noise, alphas_cumprod)

    assert (noisy - reference.add_noise(x0, noise, t)).abs().max() < 1e-5
    torch.testing.assert_close(schedules.q_sample(x0[1:2], 500, noise[1:2], alphas_cumprod), noisy[1:2])


@pytest.mark.parametrize("spacing", schedules.TIMESTEP_SPACINGS)
def test_spaced_timesteps_match_diffusers(spacing: str) -> None:
    offset = 1 if spacing == "leading" else 0
    for steps in [*range(1, 60), 61, 97, 100, 250, 333, 500, 999]:
        reference = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        reference.set_timesteps(steps)
        ours = schedules.spaced_timesteps(1000, steps, spacing=spacing, steps_offset=offset)
        assert ours.dtype == torch.float64
        if spacing == "trailing" and len(reference.timesteps) == steps + 1:
            # numpy's arange overshoots by one element for some step counts (61, ...): a -1 timestep.
            assert reference.timesteps[-1] == -1
            reference.timesteps = reference.timesteps[:-1]
        assert torch.equal(ours.round().long(), reference.timesteps), (spacing, steps)


def test_linspace_timesteps_are_fractional_like_euler() -> None:
    reference = EulerDiscreteScheduler(timestep_spacing="linspace")
    reference.set_timesteps(7)
    assert torch.equal(schedules.spaced_timesteps(1000, 7, spacing="linspace").float(), reference.timesteps)


def test_karras_sigmas_match_diffusers() -> None:
    reference = EulerDiscreteScheduler.from_config(SchedulerConfig().to_hub_config(), use_karras_sigmas=True)
    for steps in (1, 2, 10, 25):
        reference.set_timesteps(steps)
        sigma_min, sigma_max = float(reference.sigmas[-2]), float(reference.sigmas[0])
        ours = schedules.karras_sigmas(sigma_min, sigma_max, steps)
        torch.testing.assert_close(ours, reference.sigmas[:-1], rtol=1e-6, atol=0)


def test_sigma_to_timestep_inverts_the_table_and_matches_diffusers() -> None:
    alphas_cumprod = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))
    sigmas = schedules.sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = torch.tensor([0, 1, 20, 500, 998, 999])
    torch.testing.assert_close(
        schedules.sigma_to_timestep(sigmas[timesteps], alphas_cumprod), timesteps.double(), atol=1e-4, rtol=0
    )

    reference = EulerDiscreteScheduler.from_config(SchedulerConfig().to_hub_config())
    log_sigmas = np.log(sigmas.numpy())
    queries = torch.cat([torch.exp(torch.linspace(-5, 3, 40)), torch.tensor([1e-12, 0.0, 100.0])])
    ours = schedules.sigma_to_timestep(queries, alphas_cumprod)
    expected = torch.from_numpy(
        np.array([reference._sigma_to_t(np.array(s), log_sigmas) for s in queries.double().numpy()])
    )
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)
    assert ours.min() == 0 and ours.max() == 999


def test_from_hub_config_reads_the_real_configs(hub_layouts) -> None:
    sd15 = SchedulerConfig.from_hub_config(_load(hub_layouts, "stable-diffusion-v1-5"))
    sd21 = SchedulerConfig.from_hub_config(_load(hub_layouts, "stable-diffusion-2-1"))
    sd21_base = SchedulerConfig.from_hub_config(_load(hub_layouts, "stable-diffusion-2-1-base"))

    assert sd15 == SchedulerConfig()
    assert sd21 == SchedulerConfig(prediction_type="v_prediction")
    assert sd21_base == SchedulerConfig()
    # None of them gives a timestep spacing: each sampler then uses its reference class's default.
    assert sd15.timestep_spacing is sd21.timestep_spacing is sd21_base.timestep_spacing is None


def test_keys_the_config_leaves_out_stay_out(hub_layouts) -> None:
    """Saved and read back, SD 1.5's config still lets every diffusers class pick its own defaults."""
    hub = SchedulerConfig.from_hub_config(_load(hub_layouts, "stable-diffusion-v1-5")).to_hub_config()

    assert not {"timestep_spacing", "original_inference_steps", "timestep_scaling"} & set(hub)
    assert EulerDiscreteScheduler.from_config(hub).config.timestep_spacing == "linspace"
    assert DDIMScheduler.from_config(hub).config.timestep_spacing == "leading"
    assert SchedulerConfig.from_hub_config(hub) == SchedulerConfig()


def test_lcm_keys_are_read_and_written() -> None:
    lcm = {**SchedulerConfig().to_hub_config(class_name="LCMScheduler"), "original_inference_steps": 25}
    config = SchedulerConfig.from_hub_config({**lcm, "timestep_scaling": 5.0})
    assert (config.original_inference_steps, config.timestep_scaling) == (25, 5.0)
    reference = LCMScheduler.from_config(config.to_hub_config(class_name="LCMScheduler"))
    assert (reference.config.original_inference_steps, reference.config.timestep_scaling) == (25, 5.0)


def test_to_hub_config_round_trips_through_diffusers() -> None:
    config = SchedulerConfig(beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="trailing")
    hub = config.to_hub_config(class_name="DDIMScheduler")
    reference = DDIMScheduler.from_config(hub)

    assert hub["_class_name"] == "DDIMScheduler" and hub["beta_schedule"] == "squaredcos_cap_v2"
    assert reference.config.prediction_type == "v_prediction"
    assert reference.config.timestep_spacing == "trailing"
    assert (schedules.alphas_cumprod_from_config(config) - reference.alphas_cumprod).abs().max() < 1e-6
    assert SchedulerConfig.from_hub_config(hub) == config


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        ({"beta_schedule": "quadratic"}, "linear, scaled_linear, cosine"),
        ({"prediction_type": "sample"}, "epsilon, v_prediction"),
        ({"timestep_spacing": "middle"}, "leading, trailing, linspace"),
        ({"original_inference_steps": 0}, "from 1 to num_train_timesteps"),
        ({"original_inference_steps": 1001}, "from 1 to num_train_timesteps"),
        ({"timestep_scaling": 0.0}, "positive"),
    ],
)
def test_unknown_names_are_rejected_with_the_choices(change: dict, valid: str) -> None:
    with pytest.raises(ValueError, match=valid):
        dataclasses.replace(SchedulerConfig(), **change)
    with pytest.raises(ValueError, match=valid):
        SchedulerConfig.from_hub_config({**SchedulerConfig().to_hub_config(), **change})


def test_bad_schedule_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        schedules.check_prediction_type("sample")
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        schedules.make_betas("sigmoid")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        schedules.spaced_timesteps(1000, 10, spacing="even")
    with pytest.raises(ValueError, match="trained_betas"):
        SchedulerConfig.from_hub_config({"trained_betas": [0.1, 0.2]})
