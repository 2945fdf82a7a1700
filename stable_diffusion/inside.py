"""Seeing inside the reverse process: observers that watch one generation without changing it.

Three things a run can record (``StableDiffusion.generate(..., trajectory=, guidance_maps=,
attention_maps=)``); a run that asks for none of them takes exactly the code path it always takes.

* **The trajectory**: at chosen steps, the noisy latents x_t the network saw and its prediction x̂0
  (the samplers' D(x̃; σ)), decoded like the live previews (``StableDiffusion.preview``).
* **Where guidance pushes**: |ε̂_cond − ε̂_uncond| averaged over the latent channels, at chosen
  steps: the pixels whose prediction the prompt changes most (Ho & Salimans 2022's guidance
  direction). Only with guidance (scale > 1), the only case with an unconditional prediction.
* **Which word painted which pixel**: cross-attention word maps in the spirit of DAAM (Tang et al.
  2023). Every cross-attention layer's attention probabilities softmax(q·kᵀ/√d) for each prompt
  token, weighted by how much that token's value moves the layer's output, ‖W_o·v_j‖ per head
  ("attention is not only a weight", Kobayashi et al. 2020), summed over heads, layers and steps,
  upsampled to the image. Only running sums per layer are kept, never a step's attention tensors.

Observers hold per-run state, so each run builds its own; the attention probe is installed for the
current thread (or asyncio task) only (``layers.attention_probe``), so a concurrent run, observed
or not, is unaffected. The app runs one generation at a time anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import samplers
from .denoisers import GuidedDenoiser
from .layers import Attention, attention_probe
from .prompts import TokenWindow
from .request import InvalidSetting
from .samplers import Generators, SamplerDenoiser, SamplingPlan, StepCallback

__all__ = [
    "AttentionCapture",
    "GuidanceMap",
    "Observer",
    "PromptToken",
    "Snapshot",
    "StepChoice",
    "WordMap",
    "chosen_steps",
    "prompt_tokens",
    "word_maps",
]

StepChoice = int | Sequence[int]
"""Which steps to record: ``n`` spreads n steps evenly from the first to the last (0: none); a
sequence names step indices of the run, counted from 0 (negative ones from the end, as in Python)."""

WordMap = tuple[str, np.ndarray]
"""``(token text, [H, W] float32 array in [0, 1])``: one prompt token's attention map."""


@dataclass(frozen=True)
class Snapshot:
    """One recorded step of one image: what the network saw (x_t) and what it predicted (x̂0)."""

    step: int
    sigma: float
    timestep: float
    noisy: Image.Image
    denoised: Image.Image


@dataclass(frozen=True)
class GuidanceMap:
    """One recorded step of one image: mean over channels of |ε̂_cond − ε̂_uncond|, ``[H, W]`` float32."""

    step: int
    sigma: float
    timestep: float
    difference: np.ndarray


@dataclass(frozen=True)
class PromptToken:
    """A token of the prompt: its position in the text encoder's output and its text."""

    position: int
    text: str


def prompt_tokens(tokenizer: Any, windows: Sequence[TokenWindow]) -> list[PromptToken]:
    """The prompt's own tokens in the concatenated windows' context (BOS, EOS and padding left out).

    Each window is BOS, its tokens, EOS, then padding (``prompts.token_windows``).
    """
    tokens = []
    for index, window in enumerate(windows):
        for offset, token_id in enumerate(window.ids[1:], start=1):
            if token_id == tokenizer.eos_token_id:
                break
            tokens.append(PromptToken(index * len(window.ids) + offset, tokenizer.decode([token_id]).strip()))
    return tokens


def chosen_steps(choice: StepChoice, total: int, *, setting: str) -> tuple[int, ...]:
    """The sorted step indices (0 to ``total`` − 1) that ``choice`` names (see ``StepChoice``)."""
    if isinstance(choice, bool | str) or not isinstance(choice, int | Sequence):
        raise InvalidSetting(setting, f"must be a number of steps or a list of step indices, got {choice!r}.")
    if isinstance(choice, int):
        if choice < 0:
            raise InvalidSetting(setting, f"must be a number of steps of at least 0 (0: none), got {choice}.")
        count = min(choice, total)
        return tuple(sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}))
    steps = set()
    for step in choice:
        if isinstance(step, bool) or not isinstance(step, int) or not -total <= step < total:
            raise InvalidSetting(
                setting, f"names step {step!r}, but this run has {total} steps: use indices from 0 to {total - 1} "
                "(or negative ones, counted from the end)."
            )
        steps.add(step % total)
    return tuple(sorted(steps))


class AttentionCapture:
    """An attention probe (``layers.attention_probe``) that sums each cross-attention layer's word maps.

    For a batch of ``batch_size`` images it keeps, per layer, the running sum over calls of the
    attention probabilities of every query position on every key token, summed over heads:
    ``[batch, positions, tokens]``. ``weighting="value"`` weights each head's probability for token j
    by ‖W_o·v_j‖, how far token j's value moves that head's share of the output (Kobayashi et al.
    2020); ``"probability"`` is the plain sum (DAAM's). With classifier-free guidance the batch is
    ``[unconditional, conditional]`` (``denoisers.GuidedDenoiser``): only the conditional half is
    the prompt's. Calls while ``enabled`` is False are skipped (to study step ranges). One capture
    serves one run: its text, hence each layer's values, is the same at every call.
    """

    def __init__(self, batch_size: int, *, weighting: str = "value") -> None:
        if weighting not in ("value", "probability"):
            raise ValueError(f"Unknown weighting {weighting!r}: choose 'value' or 'probability'.")
        self.batch_size = batch_size
        self.weighting = weighting
        self.enabled = True
        self.sums: dict[nn.Module, torch.Tensor] = {}
        self.value_norms: dict[nn.Module, torch.Tensor] = {}

    def __call__(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.enabled:
            return
        if q.shape[0] == 2 * self.batch_size:
            q, k, v = q[self.batch_size :], k[self.batch_size :], v[self.batch_size :]
        # All heads at once, [B, heads, positions, tokens]: 10 MB per image at SD 1.5's 64×64 layers
        # (0.2% of a run's memory), and a few large operations instead of many small ones per head.
        probabilities = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        if self.weighting == "value":
            # The values come from the text alone, the same at every step: their norms once per layer.
            if module not in self.value_norms:
                self.value_norms[module] = self._value_norms(module, v)
            total = torch.einsum("bhnj,bhj->bnj", probabilities, self.value_norms[module])
        else:
            total = probabilities.sum(dim=1)
        if module in self.sums:
            self.sums[module] += total
        else:
            self.sums[module] = total

    @staticmethod
    def _value_norms(module: Attention, v: torch.Tensor) -> torch.Tensor:
        """‖W_o^h·v_hj‖ for each image, head h and token j: ``[B, heads, tokens]``."""
        out_weight = module.to_out.weight.float().view(-1, module.num_heads, module.head_dim)
        return torch.einsum("bhjd,ohd->bhjo", v.float(), out_weight).norm(dim=-1)

    def maps(self, height: int, width: int, *, finest_only: bool = False) -> torch.Tensor:
        """The layers' sums on the ``height`` × ``width`` latent grid, added up: ``[batch, tokens, height, width]``.

        A layer's positions are a grid the UNet downsampled by a power of 2 (each stride-2 conv
        rounds up); each is upsampled bilinearly. ``finest_only`` keeps the layers at the finest
        resolution.
        """
        if not self.sums:
            raise ValueError("No cross-attention was captured: run the UNet inside layers.attention_probe(capture).")
        finest = max(total.shape[1] for total in self.sums.values())
        combined = None
        for total in self.sums.values():
            if finest_only and total.shape[1] != finest:
                continue
            grid = _grid_of(total.shape[1], height, width)
            layer_map = total.transpose(1, 2).reshape(total.shape[0], total.shape[2], *grid)
            layer_map = F.interpolate(layer_map, size=(height, width), mode="bilinear", align_corners=False)
            combined = layer_map if combined is None else combined + layer_map
        return combined


def _grid_of(positions: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with ``positions`` query positions for a ``height`` × ``width`` latent."""
    factor = 1
    while factor <= max(height, width):
        grid = (math.ceil(height / factor), math.ceil(width / factor))
        if grid[0] * grid[1] == positions:
            return grid
        factor *= 2
    raise ValueError(f"{positions} attention positions are no UNet level of a {height}x{width} latent.")


def word_maps(maps: torch.Tensor, tokens: Sequence[PromptToken], size: tuple[int, int]) -> list[list[WordMap]]:
    """Per image, each token's map (from ``AttentionCapture.maps``) upsampled to ``size`` = (width, height), over its maximum."""
    if not tokens:
        return [[] for _ in range(maps.shape[0])]
    chosen = maps[:, [token.position for token in tokens]]
    chosen = F.interpolate(chosen, size=(size[1], size[0]), mode="bilinear", align_corners=False).clamp(min=0)
    peak = chosen.amax(dim=(2, 3), keepdim=True)
    chosen = (chosen / torch.where(peak > 0, peak, 1)).cpu().numpy()
    return [[(token.text, image_maps[i]) for i, token in enumerate(tokens)] for image_maps in chosen]


@dataclass
class _Recorded:
    step: int
    noisy: torch.Tensor  # model-space x_t [B, C, h, w]
    denoised: torch.Tensor  # x̂0


class Observer:
    """What one run records: built by the pipeline for a run that asked for any of it.

    ``run`` replaces ``samplers.run``: it watches the guided denoiser's inputs (x̃, σ) and, when
    asked, its two halves and the cross-attention, and keeps what the chosen steps need.
    """

    def __init__(
        self,
        plan: SamplingPlan,
        *,
        trajectory: StepChoice = 0,
        guidance_maps: StepChoice = 0,
        attention_tokens: Sequence[PromptToken] | None = None,
    ) -> None:
        self.plan = plan
        self.trajectory_steps = chosen_steps(trajectory, plan.num_steps, setting="trajectory")
        self.guidance_steps = chosen_steps(guidance_maps, plan.num_steps, setting="guidance_maps")
        self.attention_tokens = attention_tokens
        self.capture: AttentionCapture | None = None
        self._input: tuple[torch.Tensor, float] | None = None
        self._difference: torch.Tensor | None = None
        self._step = 0  # the step the denoiser's calls belong to, until the sampler reports it
        self._trajectory: list[_Recorded] = []
        self._guidance: list[tuple[int, torch.Tensor]] = []

    def observing_guidance(self, denoiser: GuidedDenoiser) -> GuidedDenoiser:
        """``denoiser`` reporting its two halves' predictions here, when guidance maps are asked for."""
        return dataclasses.replace(denoiser, observer=self._observe_guidance) if self.guidance_steps else denoiser

    def run(
        self,
        denoiser: SamplerDenoiser,
        x: torch.Tensor,
        *,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """``samplers.run(plan, denoiser, x, ...)``, observed (see :meth:`observing_guidance`)."""
        probe = contextlib.nullcontext()
        if self.attention_tokens is not None:
            self.capture = AttentionCapture(x.shape[0])
            probe = attention_probe(self.capture)

        def watched(x: torch.Tensor, sigma: float, **options: Any) -> torch.Tensor:
            self._input = (x, sigma)
            return denoiser(x, sigma, **options)

        def on_step(step: int, total: int, x0_hat: torch.Tensor) -> None:
            self._record(step, x0_hat)
            if callback is not None:
                callback(step, total, x0_hat)

        with probe:
            return samplers.run(self.plan, watched, x, generator=generator, callback=on_step)

    def _observe_guidance(self, sigma: float, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> None:
        if self._step in self.guidance_steps:  # the other steps' maps would be thrown away
            self._difference = (eps_cond - eps_uncond).abs().mean(dim=1, keepdim=True)

    def _record(self, step: int, x0_hat: torch.Tensor) -> None:
        x, sigma = self._input
        if step in self.trajectory_steps:
            # The network sees x_t = x̃/√(1+σ²) (denoisers.Denoiser), in the VAE's latent space.
            self._trajectory.append(_Recorded(step, x * (1 + sigma**2) ** -0.5, x0_hat.clone()))
        if step in self.guidance_steps and self._difference is not None:
            self._guidance.append((step, self._difference))
        self._difference = None
        self._step = step + 1

    def views(self, preview: Callable[[torch.Tensor], list[Image.Image]], size: tuple[int, int]) -> dict[str, list]:
        """The ``Generation`` fields of what was recorded, with images of ``size`` = (width, height)."""
        return {
            "trajectory": self.trajectory(preview),
            "guidance_maps": self.guidance_maps(size),
            "attention_maps": self.attention_maps(size),
        }

    def trajectory(self, preview: Callable[[torch.Tensor], list[Image.Image]]) -> list[list[Snapshot]]:
        """Per image, the recorded steps decoded with ``preview`` (``StableDiffusion.preview``); [] if not asked."""
        if not self.trajectory_steps:
            return []
        per_image: list[list[Snapshot]] = [[] for _ in range(self._batch_size)]
        for recorded in self._trajectory:
            sigma, timestep = self._step_labels(recorded.step)
            for i, (noisy, denoised) in enumerate(zip(preview(recorded.noisy), preview(recorded.denoised), strict=True)):
                per_image[i].append(Snapshot(recorded.step, sigma, timestep, noisy, denoised))
        return per_image

    def guidance_maps(self, size: tuple[int, int]) -> list[list[GuidanceMap]]:
        """Per image, the recorded guidance differences upsampled to ``size`` = (width, height); [] if not asked.

        A run without guidance (scale ≤ 1, or a guidance-distilled UNet) records none.
        """
        if not self.guidance_steps:
            return []
        per_image: list[list[GuidanceMap]] = [[] for _ in range(self._batch_size)]
        for step, difference in self._guidance:
            sigma, timestep = self._step_labels(step)
            upsampled = F.interpolate(difference, size=(size[1], size[0]), mode="bilinear", align_corners=False)
            for i, image_map in enumerate(upsampled[:, 0].cpu().numpy()):
                per_image[i].append(GuidanceMap(step, sigma, timestep, image_map))
        return per_image

    def attention_maps(self, size: tuple[int, int]) -> list[list[WordMap]]:
        """Per image, each prompt token's word map at ``size`` = (width, height); [] if not asked."""
        if self.capture is None:
            return []
        height, width = self._latent_size
        return word_maps(self.capture.maps(height, width), self.attention_tokens, size)

    @property
    def _batch_size(self) -> int:
        return self._input[0].shape[0]

    @property
    def _latent_size(self) -> tuple[int, int]:
        return tuple(self._input[0].shape[-2:])

    def _step_labels(self, step: int) -> tuple[float, float]:
        return float(self.plan.sigmas[step]), float(self.plan.timesteps[step])
