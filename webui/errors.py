"""Errors the page shows to the user, and how the package's errors become them."""

from __future__ import annotations

import logging

import gradio as gr
import torch

from stable_diffusion.hub import ModelLoadError
from stable_diffusion.request import InvalidSetting

__all__ = ["LABELS", "RequestError", "user_error"]

logger = logging.getLogger(__name__)

# The request's settings under the labels the page shows.
LABELS = {
    "prompt": "The prompt",
    "negative_prompt": "The negative prompt",
    "width": "Width",
    "height": "Height",
    "size": "Width x height",
    "steps": "Steps",
    "guidance_scale": "Guidance scale (CFG)",
    "sampler": "Sampler",
    "seed": "Seed",
    "num_images": "Number of images",
    "clip_skip": "CLIP skip",
    "strength": "Strength",
    "decoder": "Decoder",
    "mask_blur": "Mask blur",
    "paste_back": "Paste back",
    # The inside views' steps: the page asks for both with one slider.
    "trajectory": "Steps shown (N)",
    "guidance_maps": "Steps shown (N)",
}


class RequestError(gr.Error):
    """A bad request: its message is shown to the user, and no traceback clutters the server log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


def user_error(error: Exception) -> Exception:
    """The error to show for an exception of a request: the user's mistakes by name, ours as they are."""
    if isinstance(error, InvalidSetting):
        return RequestError(f"{LABELS.get(error.setting, error.setting)} {error.problem}")
    if isinstance(error, (ValueError, ModelLoadError)):
        return RequestError(str(error))
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return RequestError("Out of memory on the GPU: try a smaller size or fewer images.")
    logger.error("Generation failed", exc_info=error)
    return error
