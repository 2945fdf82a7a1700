"""Noise schedules of discrete-time diffusion models, as plain functions that return tensors.

A schedule is the sequence β_1..β_T of the forward process q(x_t | x_{t-1}) = N(√(1-β_t)·x_{t-1}, β_t·I)
(Ho et al. 2020, eq. 2). Everything a sampler or a plot needs follows from it:

    α_t = 1 - β_t,   ᾱ_t = ∏_{s≤t} α_s,   x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε          (Ho et al. 2020, eq. 4)
    σ_t = √((1-ᾱ_t)/ᾱ_t)   the noise level of x_t/√ᾱ_t = x_0 + σ_t·ε   (Karras et al. 2022, VP column of Table 1)
    SNR(t) = ᾱ_t/(1-ᾱ_t) = 1/σ_t²                                         (Kingma et al. 2021, eq. 1-2)

Index t runs from 0 to T-1, as in diffusers and the checkpoints (t = 0 is the first noising step).
Values are computed in float64 and returned as float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "SchedulerConfig",
    "alphas_cumprod",
    "alphas_cumprod_from_config",
    "check_prediction_type",
    "karras_sigmas",
    "log_snr",
    "make_betas",
    "q_sample",
    "rescale_zero_terminal_snr",
    "sigma_to_timestep",
    "sigmas_from_alphas_cumprod",
    "snr",
    "spaced_timesteps",
]

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' name for the cosine schedule ("squared cosine, β capped at 0.999, second version").
_HUB_BETA_SCHEDULE_NAMES = {"squaredcos_cap_v2": "cosine"}

# A zero terminal ᾱ (zero-SNR schedules) makes σ_T infinite. Samplers that work with σ replace it by
# the smallest positive float16 subnormal, as diffusers' sigma-based schedulers do: σ_T ≈ 4096.
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {kind} {value!r}: choose one of {', '.join(choices)}.")


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``prediction_type`` is one of ``PREDICTION_TYPES``."""
    _check_choice("prediction type", prediction_type, PREDICTION_TYPES)


@dataclass(frozen=True)
class SchedulerConfig:
    """How a checkpoint was trained to be noised, and how sampling timesteps are spaced.

    The defaults are Stable Diffusion's (1.x and 2.x). ``set_alpha_to_one`` only matters to DDIM:
    whether its last step lands on ᾱ = 1 (σ = 0) or stops at ᾱ_0 (SD's configs say False).

    ``None`` means the model's config leaves the key out, and each sampler then uses the default
    of the diffusers scheduler class it reproduces: SD 1.5's config has no ``timestep_spacing``,
    so DDPM and DDIM space their steps "leading" and Euler, Euler a and DPM++ "linspace" (starting
    at σ_max, as the web UIs' k-diffusion samplers do). ``original_inference_steps`` and
    ``timestep_scaling`` are the LCM sampler's (Luo et al. 2023): the distillation schedule's
    length and the scale of t in the boundary condition; ``None`` is ``LCMScheduler``'s 50 and 10.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = False
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        _check_choice("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        check_prediction_type(self.prediction_type)
        if self.timestep_spacing is not None:
            _check_choice("timestep spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}.")
        steps = self.original_inference_steps
        if steps is not None and not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps must be from 1 to num_train_timesteps ({self.num_train_timesteps}), "
                f"got {steps}."
            )
        if self.timestep_scaling is not None and not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be positive, got {self.timestep_scaling}.")

    @classmethod
    def from_hub_config(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Read a diffusers ``scheduler_config.json`` (any scheduler class).

        Keys about the schedule are read; keys of one scheduler's algorithm (``skip_prk_steps``,
        ``solver_order``, ...) are ignored, since the sampler is chosen per request. Missing keys
        take this class's defaults (SD 1.5's file has no ``prediction_type``: ε-prediction; nor
        ``timestep_spacing``: each sampler's reference default).
        """
        if config.get("trained_betas") is not None:
            raise ValueError(
                "trained_betas is not supported: give beta_schedule (one of "
                f"{', '.join(BETA_SCHEDULES)}) with beta_start and beta_end instead."
            )
        if config.get("clip_sample"):
            # x̂0 of a latent model is not confined to [-1, 1]; SD's own configs say false.
            logger.warning("Ignoring clip_sample=True in the scheduler config: latents are not clipped.")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in fields}
        if "beta_schedule" in values:
            values["beta_schedule"] = _HUB_BETA_SCHEDULE_NAMES.get(values["beta_schedule"], values["beta_schedule"])
        return cls(**values)

    def to_hub_config(self, *, class_name: str = "PNDMScheduler") -> dict[str, Any]:
        """A ``scheduler_config.json`` dict that diffusers' schedulers read (``from_config``)."""
        hub_names = {ours: theirs for theirs, ours in _HUB_BETA_SCHEDULE_NAMES.items()}
        # Keys the model's config left out stay out, so that each diffusers class uses its default.
        config = {key: value for key, value in dataclasses.asdict(self).items() if value is not None}
        config["beta_schedule"] = hub_names.get(self.beta_schedule, self.beta_schedule)
        return {
            "_class_name": class_name,
            **config,
            "clip_sample": False,
            "skip_prk_steps": True,
            "trained_betas": None,
        }


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """β_t for t = 0..T-1.

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020, §4).
    ``scaled_linear``: evenly spaced in √β (the latent diffusion models', Rombach et al. 2022).
    ``cosine``: β_t = min(1 - ᾱ(t+1)/ᾱ(t), 0.999) with ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008
    (Nichol & Dhariwal 2021, eq. 17); ``beta_start``/``beta_end`` are not used.
    """
    _check_choice("beta schedule", schedule, BETA_SCHEDULES)
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        s = 0.008
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        # The cap keeps the last steps from destroying the signal in one go (β = 1 at t = T).
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return betas.float()


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that ᾱ_{T-1} = 0 (zero SNR at the last step), keeping ᾱ_0.

    Lin et al. 2023, Algorithm 1: shift √ᾱ_t so its last value is 0, then scale it so its first
    value is unchanged. Models fine-tuned on it can generate very dark or bright images.
    """
    sqrt_alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_bar = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).float()


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 - β_s) (Ho et al. 2020, §2)."""
    return torch.cumprod(1 - betas.double(), dim=0).float()


def alphas_cumprod_from_config(config: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t of ``config``'s schedule, ready for sampling.

    With ``rescale_betas_zero_snr`` the last ᾱ is 2⁻²⁴ instead of 0, so that σ stays finite
    (as diffusers' sigma-based schedulers do).
    """
    betas = make_betas(
        config.beta_schedule,
        config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(betas).clamp(min=_ZERO_SNR_ALPHA_CUMPROD)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1-ᾱ_t)/ᾱ_t): the noise level of x_t/√ᾱ_t = x_0 + σ_t·ε (inf where ᾱ_t = 0)."""
    return _sigmas64(alphas_cumprod).float()


def _sigmas64(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = alphas_cumprod.double()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = ᾱ_t/(1-ᾱ_t) (Kingma et al. 2021, eq. 2)."""
    alphas_cumprod = alphas_cumprod.double()
    return (alphas_cumprod / (1 - alphas_cumprod)).float()


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log SNR(t) = log(ᾱ_t/(1-ᾱ_t)) = -2·log σ_t (λ_t of Lu et al. 2022 is half of it)."""
    alphas_cumprod = alphas_cumprod.double()
    return (alphas_cumprod.log() - torch.log1p(-alphas_cumprod)).float()


def q_sample(
    x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Sample the forward process: x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε (Ho et al. 2020, eq. 4).

    ``t`` is one integer timestep or a tensor ``[B]`` of them, one per batch item of ``x0``.
    """
    # Coefficients in float64 on the CPU (some accelerators have no float64), then moved to x0.
    alpha_cumprod = alphas_cumprod.detach().cpu().double()[torch.as_tensor(t).cpu()]
    # [B] -> [B, 1, ..., 1] to broadcast over the item's dimensions.
    alpha_cumprod = alpha_cumprod.reshape(-1, *([1] * (x0.ndim - 1)))
    signal = alpha_cumprod.sqrt().to(x0.device, x0.dtype)
    noise_level = (1 - alpha_cumprod).sqrt().to(x0.device, x0.dtype)
    return signal * x0 + noise_level * noise


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    *,
    spacing: str,
    steps_offset: int = 0,
) -> torch.Tensor:
    """``steps`` of the training timesteps, in decreasing order, as float64 (see Lin et al. 2023, Table 2).

    ``leading``: 0, k, 2k, ... with k = T // steps, plus ``steps_offset`` (SD uses 1), so the
    largest timestep is well below T-1. ``trailing``: round(T - i·T/steps) - 1, so sampling starts
    at T-1 (needed by zero-SNR schedules). ``linspace``: evenly spaced from 0 to T-1, possibly
    fractional (samplers of discrete timesteps round them).
    """
    _check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    index = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        timesteps = (index * (num_train_timesteps // steps)).flip(0) + steps_offset
    elif spacing == "trailing":
        # The step is taken as (T - T/steps) - T, as numpy's arange does in the reference: the
        # rounding ties (937.5 and the like) then fall the same way.
        step = (num_train_timesteps - num_train_timesteps / steps) - num_train_timesteps
        timesteps = torch.round(num_train_timesteps + index * step) - 1
    else:
        # i·(T-1)/(steps-1) with the last value set exactly, as numpy's linspace computes it.
        timesteps = index * ((num_train_timesteps - 1) / max(steps - 1, 1))
        timesteps[-1] = num_train_timesteps - 1 if steps > 1 else 0
        timesteps = timesteps.flip(0)
    return timesteps


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, *, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in σ^(1/ρ).

    Karras et al. 2022, eq. 5 (without the final σ = 0); ρ = 7 spends more steps at low noise.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).float()


def sigma_to_timestep(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep t of each noise level in ``sigma``, as float64.

    Interpolates linearly in log σ between the two neighbouring training timesteps, and clamps to
    [0, T-1] outside them: a discrete-time network is conditioned on t, a sampler thinks in σ
    (the same mapping as k-diffusion's and diffusers' ``_sigma_to_t``).
    """
    log_sigmas = _sigmas64(alphas_cumprod).log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    weight = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low + weight.clamp(0, 1)
