"""Inpainting's pictures: reading masks, the masks the model sees, the outpainting canvas, pasting back.

A mask says where to repaint: white (or opaque, on a transparent mask) repaints, black (or
transparent) keeps. The model sees it binary (as diffusers' ``VaeImageProcessor`` with
``do_binarize``: resized to the generation size, then 1 where it is at least half white), and at
latent size by nearest-neighbour sampling. ``mask_blur`` (pixels, a Gaussian's σ as in the popular
web UIs) softens the mask before both the model's mask and the paste-back are made from it.

Paste-back (``paste_back=True``) returns the input picture at its own size: the generated image
(resized to it where the generation size differs) faded in over the blurred mask, and the
picture's own pixels, bit for bit, where the blurred mask is 0. The blur therefore also fades an
outpainting seam a few pixels into the original. Outpainting is inpainting on a larger canvas
(``outpaint_canvas``).

Everything here works on PIL images and returns tensors only where the model needs them; the
pipeline (``pipelines.py``) decides what the UNet sees.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .images import as_pil, checked_image, to_rgb

__all__ = ["blurred", "model_masks", "outpaint_canvas", "paste_back", "read_mask"]

# The outpainting fill: the stretched edge, softened across the stretch by this blur (pixels),
# plus Gaussian noise of this many 8-bit levels, so the model has colours and texture to start from.
_FILL_BLUR = 4
_FILL_NOISE = 24.0


def read_mask(mask: object, *, size: tuple[int, int]) -> Image.Image:
    """``mask`` (a PIL image or an array, any mode) as 8-bit gray at ``size``: 255 repaints, 0 keeps.

    A mask with transparency is read by its alpha (what a brush layer of an image editor holds);
    an opaque one by its brightness. A mask of another size is resized to ``size``.
    """
    mask = as_pil(mask, what="mask")
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        gray = alpha if alpha.getextrema() != (255, 255) else to_rgb(mask).convert("L")
    else:
        gray = to_rgb(mask).convert("L")
    return gray if gray.size == size else gray.resize(size, Image.LANCZOS)


def blurred(mask: Image.Image, radius: float) -> Image.Image:
    """The mask under a Gaussian blur of σ = ``radius`` pixels (the web UIs' "Mask blur")."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def model_masks(
    mask: Image.Image, width: int, height: int, *, downsampling_factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary masks the model sees: ``[1, 1, height, width]`` and at latent size, 1 = repaint.

    As diffusers' inpainting pipelines: resize (Lanczos), binarize at one half, and sample the
    latent-size mask by nearest neighbour. An empty mask is an error: there is nothing to repaint.
    A full mask is allowed: everything is repainted (image-to-image at the strength, or for
    strength 1 a new picture).
    """
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    gray = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    pixel_mask = (gray >= 0.5).float()
    latent_mask = F.interpolate(pixel_mask, size=(height // downsampling_factor, width // downsampling_factor))
    if not latent_mask.any():
        raise ValueError(
            "The mask marks nothing to repaint at the model's resolution (one latent pixel is "
            f"{downsampling_factor}x{downsampling_factor} pixels): paint the area to repaint in white (or "
            "opaque on a transparent mask), larger than that."
        )
    return pixel_mask, latent_mask


def paste_back(images: list[Image.Image], original: Image.Image, mask: Image.Image) -> list[Image.Image]:
    """Each image over ``original`` where ``mask`` (gray, ``original``'s size) is white, faded where it is gray.

    Outside the mask (0) the result is ``original``'s own pixels, bit for bit, as the web UIs do
    after inpainting. Images of another size are resized to ``original``'s first.
    """
    if mask.size != original.size:
        raise ValueError(f"The paste-back mask is {mask.size}, the original {original.size}: give them one size.")
    resized = [image if image.size == original.size else image.resize(original.size, Image.LANCZOS) for image in images]
    return [Image.composite(image, original, mask) for image in resized]


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked area (white in ``mask``) painted in the colours around it.

    What the web UIs call the "fill" start for inpainting at a strength below 1: the kept pixels,
    weighted by how much they are kept (premultiplied alpha), are blurred at decreasing radii and
    layered, so wide blurs carry colour deep into the hole and narrow ones keep it sharp near its
    edge; the kept area itself comes out unchanged.
    """
    keep = Image.fromarray(255 - np.asarray(mask.convert("L")))
    kept = image.convert("RGBA")
    kept.putalpha(keep)
    premultiplied = kept.convert("RGBa")
    filled = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(layers):
            filled.alpha_composite(layer)
    return filled.convert("RGB")


def outpaint_canvas(
    image: Image.Image,
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    mask: Image.Image | None = None,
    seed: int = 0,
) -> tuple[Image.Image, Image.Image]:
    """``image`` on a canvas extended by the given pixels on each side, and the mask of the new area.

    The extensions are multiples of 8 (the model's sizes are). The new area is filled with the
    image's edges stretched outwards, softened and with some noise (``seed``), so that the model
    has colours to continue and texture to work from; inpainting the returned mask then paints
    it. ``mask`` (the image's own mask, e.g. painted by the user) is placed on the canvas and
    joined to the new area's.
    """
    image = checked_image(image)
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for side, pixels in sides.items():
        if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0 or pixels % 8:
            raise ValueError(f"{side} must be a whole number of pixels, 0 or more and a multiple of 8, got {pixels!r}.")
    if not any(sides.values()):
        raise ValueError("Give at least one side to extend (left, right, top or bottom), in pixels.")
    padding = ((top, bottom), (left, right))
    stretched = np.pad(np.asarray(image), (*padding, (0, 0)), mode="edge")
    softened = np.asarray(Image.fromarray(stretched).filter(ImageFilter.GaussianBlur(_FILL_BLUR)), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, _FILL_NOISE, softened.shape)
    new_area = np.pad(np.zeros((image.height, image.width), dtype=bool), padding, constant_values=True)
    fill = np.clip(softened + noise, 0, 255).round().astype(np.uint8)
    canvas = np.where(new_area[..., None], fill, stretched)
    area_mask = new_area.astype(np.uint8) * 255
    if mask is not None:
        area_mask = np.maximum(area_mask, np.pad(np.asarray(read_mask(mask, size=image.size)), padding))
    return Image.fromarray(canvas), Image.fromarray(area_mask)
