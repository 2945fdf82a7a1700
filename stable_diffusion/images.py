"""Pictures in and out: PIL images <-> the VAE's pixel tensors, input sizes, and PNG parameters.

The VAE reads and writes pixels in [-1, 1], channels first. Everything that turns a user's
picture into such a tensor, or a decoded tensor into a picture, is here, once: the pipelines,
the training data and the app's noise tab all call these.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "as_pil",
    "checked_image",
    "grid",
    "native_area_size",
    "pil_to_tensor",
    "save_png",
    "tensor_to_pil",
    "to_rgb",
]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: transparency is composited on white, palettes and gray expanded."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: scale to 8 bits before PIL's clipping conversion.
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def as_pil(image: object, *, what: str) -> Image.Image:
    """``image`` (a PIL image or an ``[H, W(, C)]`` uint8 array) as a loaded PIL image, or a clear error."""
    if image is None:
        raise ValueError(f"No {what}: upload or paste one.")
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except TypeError as error:
            raise ValueError(
                f"The {what} array cannot be read as an image ({error}): give [H, W] or [H, W, 3 or 4] uint8."
            ) from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"The {what} must be a PIL image or an array, got {type(image).__name__}.")
    try:
        image.load()  # PIL opens files lazily: a truncated or corrupt file fails here, not later
    except (OSError, ValueError) as error:
        raise ValueError(f"The {what} cannot be read: {error}") from None
    if image.width < 1 or image.height < 1:
        raise ValueError(f"The {what} is empty (0 pixels).")
    return image


def checked_image(image: object, *, what: str = "input image") -> Image.Image:
    """``image`` (a PIL image or an ``[H, W(, C)]`` uint8 array) as RGB, or a clear error."""
    if image is None:
        raise ValueError(f"No {what}: upload or paste an image to start from.")
    return to_rgb(as_pil(image, what=what))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor ``[3, H, W]`` in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels ``[B, 3, H, W]`` in [-1, 1] (values outside are clipped) as 8-bit RGB images."""
    array = (pixels.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(item) for item in (array * 255).round().astype(np.uint8)]


def native_area_size(size: tuple[int, int], native_side: int, *, multiple: int = 8) -> tuple[int, int]:
    """``size``'s aspect ratio at the pixel count the model was trained at (native_side²), in multiples of 8.

    The one sizing rule of image-to-image and inpainting when no width and height are given: a
    photo's own size is usually far larger (slow, and SD 1.x/2.x repeat themselves beyond their
    training size), and a thumbnail far smaller (the model cannot draw detail below it).
    """
    width, height = size
    scale = native_side / math.sqrt(width * height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> None:
    """Save ``image`` as PNG with the generation ``parameters`` in a ``parameters`` text chunk.

    The chunk is the one the popular web UIs write and read back (A1111's "PNG info").
    """
    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images of one size side by side, left to right."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    sheet = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        sheet.paste(image, (i * width, 0))
    return sheet
