"""Samplers: short pure functions that walk a denoiser down a sequence of noise levels.

Every sampler works in the variance-exploding form of Karras et al. 2022: x̃ = x_0 + σ·ε, with a
denoiser D(x̃, σ) → x̂0 (``denoisers.Denoiser``, usually wrapped by ``denoisers.guided``). The
discrete-time samplers (DDPM, DDIM, DPM-Solver++) become updates between σ's; a sampler is then
just the update rule, and which σ's it visits is the plan's business:

    plan = plan_sampling(config, "dpmpp_2m_karras", 25, strength=0.6)   # validate, lay out σ's
    x = noised_latents(plan, x0, noise)          # or initial_latents(plan, noise) from pure noise
    latents = run(plan, guided_denoiser, x, generator=generators, callback=preview)

The plans reproduce diffusers' schedulers (``DDPMScheduler``, ``DDIMScheduler``,
``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler``,
``LCMScheduler``) built with ``from_config(model's scheduler config)`` and driven as its pipelines
drive them, quirks included, so seeds give the same images.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Protocol

import torch

from .schedules import (
    SchedulerConfig,
    alphas_cumprod_from_config,
    karras_sigmas,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SamplerSpec",
    "SamplingPlan",
    "StepCallback",
    "draw_noise",
    "initial_latents",
    "noised_latents",
    "plan_sampling",
    "run",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_lcm",
]

Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int, torch.Tensor], None]
"""``callback(step_index, total_steps, x0_hat)``, called once per step with that step's x̂0."""

SamplerDenoiser = Callable[..., torch.Tensor]
"""D(x̃, σ) → x̂0 for a batch of noisy latents x̃ = x_0 + σ·ε (``denoisers.GuidedDenoiser``).

:func:`run` also passes ``round_timestep=True`` when the plan says the network sees integer timesteps.
"""


class SamplerFunction(Protocol):
    """``sample_<name>(denoiser, x, sigmas, *, generator, callback) -> x`` at the last σ."""

    def __call__(
        self,
        denoiser: SamplerDenoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor: ...


def draw_noise(
    shape: Sequence[int],
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """N(0, I) noise of ``shape`` on ``device``, drawn where the generator lives.

    With a list of generators, item i of the batch is drawn from generator i, so each image's
    noise depends only on its own seed (as diffusers' ``randn_tensor``; a list of one acts as
    that one generator).
    """
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}: give one per batch item.")
    item_shape = (1, *shape[1:])
    return torch.cat([torch.randn(item_shape, generator=g, device=g.device, dtype=dtype).to(device) for g in generator])


# ---------------------------------------------------------------- the samplers


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the move from σ to σ_next into a deterministic part down to σ_down and fresh noise σ_up.

    σ_up² = η²·σ_next²·(σ² - σ_next²)/σ², σ_down² = σ_next² - σ_up²: with η = 1 this is the
    posterior q(x_{t-1} | x_t, x_0) of Ho et al. 2020 (eq. 6-7) in σ terms; with η = 0, no noise.
    """
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _sample_ancestral(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float,
    generator: Generators,
    callback: StepCallback | None,
) -> torch.Tensor:
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback(i, total, denoised)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + draw_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma_up
    return x


def sample_euler(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ))/σ.

    Karras et al. 2022, eq. 1 and 3 with σ(t) = t, s(t) = 1; their Algorithm 1 without the
    second-order correction. Deterministic: ``generator`` is not used. It is the ancestral loop
    with η = 0, where σ_down = σ_next and no noise is added.
    """
    return _sample_ancestral(denoiser, x, sigmas, eta=0.0, generator=generator, callback=callback)


def sample_euler_ancestral(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion): an Euler step down to σ_down, then fresh noise of σ_up.

    The split of σ_next into σ_down and σ_up is the DDPM posterior's (Ho et al. 2020, eq. 6-7),
    the deterministic part Karras et al. 2022's Euler step (eq. 1 and 3): a stochastic sampler
    that forgets its starting noise, so it does not converge as steps grow.
    """
    return _sample_ancestral(denoiser, x, sigmas, eta=1.0, generator=generator, callback=callback)


def sample_ddpm(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling: x_{t-1} ~ q(x_{t-1} | x_t, x̂0) (Ho et al. 2020, eq. 6-7, Algorithm 2).

    With the "fixed small" variance β̃_t. Written in σ's, the posterior mean (1-σ_s²/σ_t²)·x̂0 +
    (σ_s²/σ_t²)·x̃_t and variance σ_s²(σ_t² - σ_s²)/σ_t² are those of an ancestral Euler step; the
    sampler differs from ``euler_a`` by the σ's it visits (its plan's training timesteps).
    """
    return _sample_ancestral(denoiser, x, sigmas, eta=1.0, generator=generator, callback=callback)


def sample_ddim(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12, with σ_t(η) of eq. 16).

    x_{t-1} = √ᾱ_{t-1}·x̂0 + √(1-ᾱ_{t-1}-σ_t²)·ε̂ + σ_t·z; divided by √ᾱ_{t-1} this is
    x̃_{t-1} = x̂0 + σ_down·ε̂ + σ_up·z with ε̂ = (x̃_t - x̂0)/σ_t and the ancestral split of η. With
    η = 0 it is deterministic, and the same update as Euler's method (Karras et al. 2022, §3).
    Each step goes to the next timestep of the plan. (diffusers' DDIM goes to t - T//steps instead,
    which differs with linspace spacing and with trailing spacing when T % steps ≠ 0: diffusers
    issue #12633; its DDPM scheduler was fixed the same way in #9384.)
    """
    return _sample_ancestral(denoiser, x, sigmas, eta=eta, generator=generator, callback=callback)


def sample_dpmpp_2m(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order solver of Lu et al. 2022 (Algorithm 2).

    With λ = -log σ and h = λ_{i+1} - λ_i: x̃_{i+1} = (σ_{i+1}/σ_i)·x̃_i - (e^{-h} - 1)·D, where
    D = (1 + 1/2r)·x̂0_i - (1/2r)·x̂0_{i-1}, r = h_{i-1}/h (their eq. for the 2M update). The first
    step (no previous x̂0) and the step onto σ = 0 are first order (D = x̂0_i), as in diffusers.
    Deterministic: ``generator`` is not used.
    """
    total = len(sigmas) - 1
    old_denoised, h_last = None, 0.0
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback(i, total, denoised)
        if sigma_next == 0:
            # The first-order update's limit as h → ∞.
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


def sample_lcm(
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    c_skip: Sequence[float] | None = None,
    c_out: Sequence[float] | None = None,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM: Luo et al. 2023, Algorithm 1).

    Each step jumps straight to a clean estimate with the consistency function
    f = c_skip·x_t + c_out·x̂0, where x_t = x̃/√(1+σ²) is what the network saw (the skip
    parameterization of Song et al. 2023, §3, that makes f the identity at t ≈ 0), then noises f
    afresh to the next σ: x̃' = f + σ'·z. The last step (onto σ = 0) adds no noise. ``c_skip`` and
    ``c_out`` hold one value per step (the plan computes them from the timesteps); without them
    f = x̂0. The callback sees f.
    """
    total = len(sigmas) - 1
    for name, scalings in (("c_skip", c_skip), ("c_out", c_out)):
        if scalings is not None and len(scalings) != total:
            raise ValueError(f"{name} needs one value per step ({total}), got {len(scalings)}.")
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma)
        skip = 0.0 if c_skip is None else c_skip[i]
        out = 1.0 if c_out is None else c_out[i]
        consistent = skip * (x * (1 + sigma**2) ** -0.5) + out * denoised
        if callback is not None:
            callback(i, total, consistent)
        x = consistent
        if sigma_next > 0:
            x = x + draw_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma_next
    return x


# ---------------------------------------------------------------- registry and plans


@dataclass(frozen=True)
class SamplerSpec:
    """A user-facing sampler: its update rule, its web-UI label, and which reference scheduler's σ's it visits.

    ``label`` is the name AUTOMATIC1111's web UI gives it (written in the PNG ``parameters`` text).
    ``layout`` is one of ``ddpm``, ``ddim``, ``euler``, ``dpm``, ``lcm`` (the diffusers scheduler
    whose timesteps, σ's and starting noise the plan reproduces); ``karras`` swaps the σ's for
    Karras et al. 2022's (eq. 5, ρ = 7).
    """

    sample: SamplerFunction
    label: str
    description: str
    layout: str
    karras: bool = False


SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(
    {
        "ddpm": SamplerSpec(
            sample_ddpm, "DDPM", "DDPM: the original ancestral chain; stochastic, needs many steps", "ddpm"
        ),
        "ddim": SamplerSpec(sample_ddim, "DDIM", "DDIM: deterministic (η = 0) shortcut of the DDPM chain", "ddim"),
        "euler": SamplerSpec(
            sample_euler, "Euler", "Euler: first-order ODE solver in σ; fast and deterministic", "euler"
        ),
        "euler_a": SamplerSpec(
            sample_euler_ancestral,
            "Euler a",
            "Euler ancestral: Euler plus fresh noise each step; varied results",
            "euler",
        ),
        "euler_karras": SamplerSpec(
            sample_euler,
            "Euler Karras",
            "Euler on Karras σ's: more steps at low noise for finer detail",
            "euler",
            karras=True,
        ),
        "dpmpp_2m": SamplerSpec(
            sample_dpmpp_2m, "DPM++ 2M", "DPM++ 2M: second-order multistep; good in 20-30 steps", "dpm"
        ),
        "dpmpp_2m_karras": SamplerSpec(
            sample_dpmpp_2m,
            "DPM++ 2M Karras",
            "DPM++ 2M Karras: DPM++ 2M on Karras σ's; the usual default",
            "dpm",
            karras=True,
        ),
        "lcm": SamplerSpec(
            sample_lcm,
            "LCM",
            "LCM: consistency sampling for LCM-distilled models or the LCM-LoRA; 2-8 steps, guidance 1-2",
            "lcm",
        ),
    }
)
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)

# The timestep spacing of each layout's diffusers class when the model's config gives none (its
# constructor default in diffusers 0.42: "leading" for DDPM and DDIM, "linspace" for Euler, Euler
# ancestral and DPM-Solver). LCM lays out its own distillation schedule and has no spacing.
_DEFAULT_SPACINGS = {"ddpm": "leading", "ddim": "leading", "euler": "linspace", "dpm": "linspace"}

# LCMScheduler's defaults for configs that leave the LCM keys out (SD 1.5's, with the LCM-LoRA),
# and the data's standard deviation σ_data that consistency models assume (0.5, as Karras et al. 2022).
_LCM_ORIGINAL_INFERENCE_STEPS = 50
_LCM_TIMESTEP_SCALING = 10.0
_LCM_SIGMA_DATA = 0.5


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """What one sampling run visits, computed up front so that the run itself holds no state.

    ``timesteps``: the network's timesteps of the steps to run (diffusers' ``scheduler.timesteps``
    from the img2img start on). ``sigmas``: their σ's followed by the final σ (0, or σ(ᾱ_0) for
    DDIM without ``set_alpha_to_one``). ``init_noise_scale``: what N(0, I) noise is multiplied by
    to start from pure noise. ``round_timesteps``: the network sees round(t(σ)), not t(σ).
    ``options``: keyword options of ``sample`` (DDIM's η, LCM's per-step c_skip and c_out).
    """

    sampler: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    init_noise_scale: float
    sample: SamplerFunction
    round_timesteps: bool
    options: Mapping[str, float | tuple[float, ...]]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class _Layout(NamedTuple):
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    init_noise_scale: float
    round_timesteps: bool
    options: Mapping[str, float | tuple[float, ...]] = MappingProxyType({})


def _interpolate(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """table[t] for fractional t, linear between neighbours (np.interp, as diffusers' Euler)."""
    low = timesteps.floor().long().clamp(max=len(table) - 2)
    weight = timesteps - low
    return table[low] * (1 - weight) + table[low + 1] * weight


def _spaced_timesteps(config: SchedulerConfig, steps: int, spacing: str) -> torch.Tensor:
    timesteps = spaced_timesteps(config.num_train_timesteps, steps, spacing=spacing, steps_offset=config.steps_offset)
    if timesteps[0] > config.num_train_timesteps - 1:
        # Leading spacing with an offset at (nearly) every training timestep runs off the end.
        raise ValueError(
            f"{steps} steps with {spacing} spacing and steps_offset={config.steps_offset} reach "
            f"timestep {int(timesteps[0])}, past the last training timestep {config.num_train_timesteps - 1}: "
            "use fewer steps or trailing spacing."
        )
    return timesteps


def _discrete_layout(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *, final_sigma: float) -> _Layout:
    """Integer timesteps with σ's from the training table and an N(0, I) start in x_t (DDPM, DDIM, LCM)."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)[timesteps]
    # x_T ~ N(0, I) in the network's space is x̃ = x_T·√(1+σ²).
    init_noise_scale = (1 + float(sigmas[0]) ** 2) ** 0.5
    return _Layout(timesteps, torch.cat([sigmas, sigmas.new_tensor([final_sigma])]), init_noise_scale, False)


def _ddim_final_sigma(config: SchedulerConfig, alphas_cumprod: torch.Tensor) -> float:
    # DDIM's last step goes to ᾱ = 1 (σ = 0), or only to ᾱ_0 (SD's configs), i.e. σ(t=0) > 0.
    return 0.0 if config.set_alpha_to_one else float(sigmas_from_alphas_cumprod(alphas_cumprod[:1])[0])


def _euler_layout(
    config: SchedulerConfig, steps: int, alphas_cumprod: torch.Tensor, *, spacing: str, karras: bool
) -> _Layout:
    timesteps = _spaced_timesteps(config, steps, spacing)
    sigmas = _interpolate(sigmas_from_alphas_cumprod(alphas_cumprod).double(), timesteps).float()
    if karras:
        # Between the σ's of the first and last spaced timesteps.
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        timesteps = sigma_to_timestep(sigmas, alphas_cumprod)
    sigma_max = float(sigmas.max())
    # diffusers' Euler schedulers start from N(0, σ_max²) with linspace/trailing spacing, not from the
    # exact N(0, 1 + σ_max²); reproduced so that seeds give the same images.
    init_noise_scale = (sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max
    return _Layout(timesteps.float(), torch.cat([sigmas, sigmas.new_zeros(1)]), init_noise_scale, False)


def _dpm_layout(
    config: SchedulerConfig, steps: int, alphas_cumprod: torch.Tensor, *, spacing: str, karras: bool
) -> _Layout:
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    if karras:
        # Between σ(t=0) and σ(T-1), whatever the spacing; the network sees rounded timesteps.
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
        timesteps = sigma_to_timestep(sigmas, alphas_cumprod).round().long()
    else:
        # With leading and linspace spacing, DPM-Solver lays out steps + 1 timesteps and drops the
        # last (about t = 0): its final step goes to σ = 0 instead.
        spaced = steps if spacing == "trailing" else steps + 1
        timesteps = _spaced_timesteps(config, spaced, spacing).round().long()[:steps]
        sigmas = table[timesteps]
    init_noise_scale = (1 + float(sigmas[0]) ** 2) ** 0.5
    return _Layout(timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]), init_noise_scale, karras)


def _lcm_layout(config: SchedulerConfig, steps: int, alphas_cumprod: torch.Tensor, *, strength: float) -> _Layout:
    """LCM's skipping-step schedule and boundary scalings, as diffusers' ``LCMScheduler``.

    LCM was distilled on every k-th training timestep, k = T // original_inference_steps, ending at
    T-1 (Luo et al. 2023, §4.3); sampling takes ``steps`` of them, evenly spaced by index from the
    top. Image-to-image keeps the part of that schedule below ``strength`` and still runs every step
    (diffusers' ``LatentConsistencyModelImg2ImgPipeline``). The scalings c_skip(t) = σ_d²/((s·t)² + σ_d²)
    and c_out(t) = s·t/√((s·t)² + σ_d²), s = ``timestep_scaling``, are those of the consistency
    function (Song et al. 2023, §3) with t scaled so that the boundary is sharp at t ≈ 0.
    """
    original_steps = config.original_inference_steps or _LCM_ORIGINAL_INFERENCE_STEPS
    distilled_count = int(original_steps * strength)
    if steps > distilled_count:
        raise ValueError(
            f"lcm takes its steps from the {distilled_count} distillation timesteps that "
            f"original_inference_steps={original_steps} and strength {strength} leave: use at most "
            f"{distilled_count} steps{' or a higher strength' if strength < 1 else ''}."
        )
    k = config.num_train_timesteps // original_steps
    distilled = torch.arange(distilled_count, 0, -1) * k - 1
    # numpy's linspace(0, n, steps, endpoint=False), floored: i·(n/steps).
    timesteps = distilled[(torch.arange(steps, dtype=torch.float64) * (distilled_count / steps)).floor().long()]
    scaled = timesteps.double() * (config.timestep_scaling or _LCM_TIMESTEP_SCALING)
    c_skip = _LCM_SIGMA_DATA**2 / (scaled**2 + _LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + _LCM_SIGMA_DATA**2).sqrt()
    layout = _discrete_layout(timesteps, alphas_cumprod, final_sigma=0.0)
    return layout._replace(options=MappingProxyType({"c_skip": tuple(c_skip.tolist()), "c_out": tuple(c_out.tolist())}))


def _lay_out(spec: SamplerSpec, config: SchedulerConfig, steps: int, alphas_cumprod: torch.Tensor) -> _Layout:
    """The full text-to-image layout of ``steps`` steps of a sampler that is not LCM."""
    spacing = config.timestep_spacing or _DEFAULT_SPACINGS[spec.layout]
    if spec.layout in ("ddpm", "ddim"):
        timesteps = _spaced_timesteps(config, steps, spacing).round().long()
        final_sigma = _ddim_final_sigma(config, alphas_cumprod) if spec.layout == "ddim" else 0.0
        return _discrete_layout(timesteps, alphas_cumprod, final_sigma=final_sigma)
    if spec.layout == "euler":
        return _euler_layout(config, steps, alphas_cumprod, spacing=spacing, karras=spec.karras)
    return _dpm_layout(config, steps, alphas_cumprod, spacing=spacing, karras=spec.karras)


def plan_sampling(
    config: SchedulerConfig,
    sampler: str,
    steps: int,
    *,
    strength: float = 1.0,
    eta: float = 0.0,
) -> SamplingPlan:
    """Lay out the σ's that ``sampler`` visits in ``steps`` steps for a model trained on ``config``.

    ``strength`` < 1 is image-to-image (SDEdit, Meng et al. 2022): of the ``steps`` laid out, only
    the last ``int(steps * strength)`` run, from the input image noised to the first of them (as
    diffusers' img2img pipeline counts); ``lcm`` instead runs all ``steps`` from lower in its
    schedule (see ``_lcm_layout``). ``eta`` is DDIM's η (0: deterministic, 1: DDPM-like).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}.")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"steps must be an integer from 1 to {config.num_train_timesteps}, got {steps!r}.")
    if not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be from 1 to {config.num_train_timesteps} (the training timesteps), got {steps}.")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1: start from pure noise), got {strength}.")
    if eta < 0:
        raise ValueError(f"eta must be at least 0, got {eta}.")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not to {sampler!r}.")
    spec = SAMPLERS[sampler]
    alphas_cumprod = alphas_cumprod_from_config(config)
    steps = int(steps)
    if spec.layout == "lcm":
        layout = _lcm_layout(config, steps, alphas_cumprod, strength=strength)
    else:
        run_steps = min(int(steps * strength), steps)
        if run_steps < 1:
            raise ValueError(
                f"strength {strength} runs int({steps} * {strength}) = 0 of {steps} steps: "
                f"use a strength of at least {1 / steps:.3g} or more steps."
            )
        layout = _lay_out(spec, config, steps, alphas_cumprod)
        start = steps - run_steps
        layout = layout._replace(timesteps=layout.timesteps[start:], sigmas=layout.sigmas[start:])
    return SamplingPlan(
        sampler=sampler,
        timesteps=layout.timesteps,
        sigmas=layout.sigmas,
        init_noise_scale=layout.init_noise_scale,
        sample=spec.sample,
        round_timesteps=layout.round_timesteps,
        options=MappingProxyType({**layout.options, **({"eta": eta} if sampler == "ddim" else {})}),
    )


def initial_latents(plan: SamplingPlan, noise: torch.Tensor) -> torch.Tensor:
    """The text-to-image start x̃ from N(0, I) ``noise``."""
    return noise * plan.init_noise_scale


def noised_latents(plan: SamplingPlan, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The image-to-image start: ``x0`` noised to the plan's first σ, x̃ = x0 + σ·ε.

    The same as diffusers' ``add_noise`` at the first timestep (√ᾱ·x0 + √(1-ᾱ)·ε, divided by √ᾱ).
    """
    return x0 + noise * float(plan.sigmas[0])


def run(
    plan: SamplingPlan,
    denoiser: SamplerDenoiser,
    x: torch.Tensor,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample from ``x`` (see :func:`initial_latents`, :func:`noised_latents`) along ``plan``.

    Returns the final latents in the network's space x = x̃/√(1+σ²), ready for the VAE decoder.
    ``generator`` (one, or one per batch item) draws the stochastic samplers' noise.
    """
    if plan.round_timesteps:
        denoiser = functools.partial(denoiser, round_timestep=True)
    x = plan.sample(denoiser, x, plan.sigmas, generator=generator, callback=callback, **plan.options)
    return x * (1 + float(plan.sigmas[-1]) ** 2) ** -0.5
