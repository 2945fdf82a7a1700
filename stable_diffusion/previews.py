"""Cheap live previews of the predicted x̂0 while a generation runs.

A full VAE decode of a 512² image costs more than a UNet step, so a UI cannot afford one per step.
Three ways, best first (``StableDiffusion.preview`` picks):

* the tiny autoencoder (TAESD), when loaded: a real picture for ~1/18 of a decode;
* a small VAE (the bundled toy model's): the exact decode, which costs next to nothing;
* otherwise a fixed linear map from the latent channels to RGB, upscaled: SD's latents are
  close to linearly related to colour at 1/8 resolution, so a least-squares fit on one small
  decode gives a recognisable preview in microseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .images import tensor_to_pil

__all__ = ["CHEAP_DECODE_PARAMETERS", "LatentRGB"]

# VAEs smaller than this decode previews exactly; larger ones use the linear map.
CHEAP_DECODE_PARAMETERS = 10_000_000


@dataclass(frozen=True)
class LatentRGB:
    """RGB ≈ weight · latent + bias per latent pixel, upscaled by the VAE's downsampling factor."""

    weight: torch.Tensor  # [3, latent channels]
    bias: torch.Tensor  # [3]
    downsampling_factor: int

    @classmethod
    def fit(
        cls, decode: Callable[[torch.Tensor], torch.Tensor], *, latent_channels: int, downsampling_factor: int
    ) -> LatentRGB:
        """Least squares on one decode of ``decode`` (unscaled latents -> pixels in [-1, 1])."""
        generator = torch.Generator("cpu").manual_seed(0)
        side = max(4, 64 // downsampling_factor)
        # A smooth random latent, so that the decoded colours vary slowly like real images.
        coarse = torch.randn((1, latent_channels, 4, 4), generator=generator)
        latents = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        pixels = F.avg_pool2d(decode(latents).float().cpu(), downsampling_factor)
        design = torch.cat([latents.flatten(2)[0].T, torch.ones(side * side, 1)], dim=1)
        solution = torch.linalg.lstsq(design, pixels.flatten(2)[0].T).solution  # [channels + 1, 3]
        return cls(solution[:-1].T.contiguous(), solution[-1].contiguous(), downsampling_factor)

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        """Previews of unscaled latents ``[B, C, h, w]``."""
        rgb = torch.einsum("bchw,rc->brhw", latents.float().cpu(), self.weight) + self.bias[None, :, None, None]
        images = tensor_to_pil(rgb)
        scale = self.downsampling_factor
        return [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in images]
