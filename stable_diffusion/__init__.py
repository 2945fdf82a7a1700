"""Stable Diffusion written from scratch in PyTorch.

``load(source)`` returns a :class:`StableDiffusion` pipeline with ``text_to_image`` and
``image_to_image``; the networks (``clip``, ``unet``, ``vae``), schedules, denoisers and samplers
are plain modules meant to be read.
"""

from .hub import DEFAULT_MODEL, DEFAULT_TINY_VAE, ModelLoadError, load, load_tiny_vae, save
from .images import save_png
from .pipelines import Generation, GenerationCancelled, StableDiffusion
from .samplers import SAMPLER_NAMES

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TINY_VAE",
    "Generation",
    "GenerationCancelled",
    "ModelLoadError",
    "SAMPLER_NAMES",
    "StableDiffusion",
    "load",
    "load_tiny_vae",
    "save",
    "save_png",
]
