"""The UNet as a denoiser D(x; σ) → x̂0, and classifier-free guidance around it.

Samplers work in the variance-exploding form of Karras et al. 2022: x̃ = x_t/√ᾱ_t = x_0 + σ·ε with
σ = √((1-ᾱ_t)/ᾱ_t), and need only D(x̃; σ), an estimate of x_0. The network was trained on
x_t = x̃/√(1+σ²) at a discrete timestep t and predicts ε (SD 1.x, SD 2.x base) or
v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0 (SD 2.x 768, Salimans & Ho 2022, §4). :class:`Denoiser` does that
translation (Karras et al. 2022, Table 1, VP column: c_in = 1/√(σ²+1), c_noise = t(σ)).

Nothing here keeps state between calls, so one network serves many concurrent requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .schedules import check_prediction_type, sigma_to_timestep

__all__ = [
    "Denoiser",
    "GuidanceObserver",
    "GuidedDenoiser",
    "InpaintingDenoiser",
    "KnownRegion",
    "guided",
    "predict_eps",
    "predict_x0",
    "rescale_guidance",
]

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GuidanceObserver = Callable[[float, torch.Tensor, torch.Tensor], None]
"""``observer(sigma, eps_uncond, eps_cond)``: sees both halves of each guided call, as ε̂ (``inside``)."""


def predict_x0(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_cumprod: torch.Tensor | float,
    *,
    prediction_type: str,
) -> torch.Tensor:
    """x̂0 from the network's output at x_t (ᾱ_t broadcastable to ``x_t``).

    ε: x̂0 = (x_t - √(1-ᾱ_t)·ε̂)/√ᾱ_t (Ho et al. 2020, eq. 4 solved for x_0).
    v: x̂0 = √ᾱ_t·x_t - √(1-ᾱ_t)·v̂ (Salimans & Ho 2022, §4).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_cumprod) ** 0.5 * model_output) / alpha_cumprod**0.5
    return alpha_cumprod**0.5 * x_t - (1 - alpha_cumprod) ** 0.5 * model_output


def predict_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_cumprod: torch.Tensor | float,
    *,
    prediction_type: str,
) -> torch.Tensor:
    """ε̂ from the network's output at x_t (ᾱ_t broadcastable to ``x_t``).

    ε: the output itself. v: ε̂ = √ᾱ_t·v̂ + √(1-ᾱ_t)·x_t (Salimans & Ho 2022, §4).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    return alpha_cumprod**0.5 * model_output + (1 - alpha_cumprod) ** 0.5 * x_t


class Denoiser:
    """D(x̃; σ, context) → x̂0 for a network ``model(x_t, t, context)`` trained on ``alphas_cumprod``.

    ``alphas_cumprod`` must be positive (see ``schedules.alphas_cumprod_from_config``). σ is mapped
    to its fractional timestep by interpolating log σ between training timesteps;
    ``round_timestep=True`` feeds the network the nearest integer timestep instead (diffusers'
    DPM-Solver does so with Karras σ's), while x̂0 still uses σ itself.
    """

    def __init__(self, model: Model, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        check_prediction_type(prediction_type)
        if not bool((alphas_cumprod > 0).all()):
            raise ValueError(
                "alphas_cumprod must be positive: use schedules.alphas_cumprod_from_config, "
                "which keeps σ finite for zero-terminal-SNR schedules."
            )
        self.model = model
        # σ → t runs in float64 on the CPU (some accelerators have no float64).
        self.alphas_cumprod = alphas_cumprod.detach().cpu()
        self.prediction_type = prediction_type

    def model_output(
        self,
        x: torch.Tensor,
        sigma: float,
        context: torch.Tensor,
        *,
        round_timestep: bool = False,
    ) -> torch.Tensor:
        """The network's raw prediction (ε or v) for the noisy latents x̃ = x_0 + σ·ε."""
        timestep = sigma_to_timestep(torch.tensor([sigma], dtype=torch.float64), self.alphas_cumprod)
        if round_timestep:
            timestep = timestep.round()
        t = timestep.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        # c_in: back to the unit-variance x_t = x̃·√ᾱ the network was trained on.
        return self.model(x * (1 + sigma**2) ** -0.5, t, context)

    def denoised(self, x: torch.Tensor, sigma: float, model_output: torch.Tensor) -> torch.Tensor:
        """x̂0 from x̃ and the network's (possibly guided) output at σ."""
        return predict_x0(model_output, *_x_t(x, sigma), prediction_type=self.prediction_type)

    def noise(self, x: torch.Tensor, sigma: float, model_output: torch.Tensor) -> torch.Tensor:
        """ε̂ from x̃ and the network's output at σ (the output itself for ε-prediction)."""
        return predict_eps(model_output, *_x_t(x, sigma), prediction_type=self.prediction_type)

    def __call__(
        self,
        x: torch.Tensor,
        sigma: float,
        context: torch.Tensor,
        *,
        round_timestep: bool = False,
    ) -> torch.Tensor:
        return self.denoised(x, sigma, self.model_output(x, sigma, context, round_timestep=round_timestep))


def _x_t(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
    """The network's x_t = √ᾱ·x̃ and its ᾱ = 1/(1+σ²), from x̃ = x_0 + σ·ε."""
    alpha_cumprod = 1 / (1 + sigma**2)
    return x * alpha_cumprod**0.5, alpha_cumprod


def rescale_guidance(guided_output: torch.Tensor, cond_output: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, §3.4; diffusers' ``guidance_rescale``).

    Scale the guided prediction to the per-item standard deviation of the conditional one, which
    undoes the over-exposure of large guidance scales, and blend: φ·rescaled + (1-φ)·guided.
    """
    dims = list(range(1, guided_output.ndim))
    rescaled = guided_output * (cond_output.std(dim=dims, keepdim=True) / guided_output.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided_output


@dataclass(frozen=True, eq=False)
class GuidedDenoiser:
    """D(x̃; σ) with the text conditioning bound and classifier-free guidance applied (see :func:`guided`).

    ``observer``, when set, receives ε̂ of both halves of every guided call (never called without
    guidance); it only looks, the output is the same.
    """

    denoiser: Denoiser
    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    rescale: float = field(default=0.0, kw_only=True)
    observer: GuidanceObserver | None = field(default=None, kw_only=True)

    def __call__(self, x: torch.Tensor, sigma: float, *, round_timestep: bool = False) -> torch.Tensor:
        if self.scale <= 1:
            return self.denoiser(x, sigma, self.cond, round_timestep=round_timestep)
        # Both halves in one batched call, unconditional first (diffusers' order).
        output = self.denoiser.model_output(
            torch.cat([x, x]), sigma, torch.cat([self.uncond, self.cond]), round_timestep=round_timestep
        )
        uncond_output, cond_output = output.chunk(2)
        if self.observer is not None:
            self.observer(sigma, self.denoiser.noise(x, sigma, uncond_output), self.denoiser.noise(x, sigma, cond_output))
        guided_output = uncond_output + self.scale * (cond_output - uncond_output)
        if self.rescale > 0:
            guided_output = rescale_guidance(guided_output, cond_output, self.rescale)
        return self.denoiser.denoised(x, sigma, guided_output)


def guided(
    denoiser: Denoiser,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    *,
    rescale: float = 0.0,
) -> GuidedDenoiser:
    """Classifier-free guidance: ε̂ = ε̂_uncond + w·(ε̂_cond - ε̂_uncond) (Ho & Salimans 2022, eq. 6,
    whose w is this w - 1).

    Applied to the network's output (ε or v) before x̂0 is formed, with guidance rescale φ =
    ``rescale`` (Lin et al. 2023, §3.4). With w ≤ 1 there is no guidance: only the conditional
    prediction is computed, one network call per step, as diffusers' pipelines do
    (``do_classifier_free_guidance = guidance_scale > 1``). So w = 0, the setting of few-step
    models like SD-Turbo, follows the prompt rather than ignoring it. ``cond`` and ``uncond`` are
    ``[B, L, D]`` for latents ``[B, ...]``.
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}."
        )
    if not 0 <= rescale <= 1:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}.")
    return GuidedDenoiser(denoiser, cond, uncond, scale, rescale=rescale)


@dataclass(frozen=True, eq=False)
class KnownRegion:
    """What inpainting keeps: the original latents x0 where ``mask`` is 0, and the noise ε that takes them to any σ.

    ``mask`` is 1 where the model repaints, 0 where it keeps (binary, latent size); x0 and ε are
    in the samplers' space (x̃ = x0 + σ·ε) and the network's alike, where σ = 0.
    """

    original: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def noised(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x`` inside the mask, the original noised to σ outside it: m·x + (1-m)·(x0 + σ·ε)."""
        return self.mask * x + (1 - self.mask) * (self.original + sigma * self.noise)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` inside the mask, the original outside it: m·x + (1-m)·x0."""
        return self.mask * x + (1 - self.mask) * self.original


@dataclass(frozen=True, eq=False)
class InpaintingDenoiser:
    """D(x̃; σ) for a UNet that knows no mask: it repaints only where the mask is 1.

    The network sees the sampler's x̃ inside the mask and the original noised to σ outside it,
    m·x̃ + (1-m)·(x0 + σ·ε), and x̂0 outside the mask is x0 itself. This is the blend that diffusers'
    ``StableDiffusionInpaintPipeline`` and the web UIs apply to the latents after every step (the
    known-region step of RePaint, Lugmayr et al. 2022, eq. 8, without resampling), moved into the
    denoiser as ComfyUI's ``KSamplerX0Inpaint`` does, so that the samplers stay pure functions:
    with a binary mask a sampler's update is the same pointwise arithmetic inside the mask, and
    what it holds outside the mask is never seen. At the first σ (``start_sigma``) the network sees
    x̃ as it is, since the reference blends only after a step: a strength-1 start is noise everywhere.
    """

    denoiser: Callable[..., torch.Tensor]
    known: KnownRegion
    start_sigma: float

    def __call__(self, x: torch.Tensor, sigma: float, **options: bool) -> torch.Tensor:
        if sigma < self.start_sigma:
            x = self.known.noised(x, sigma)
        return self.known.restore(self.denoiser(x, sigma, **options))
