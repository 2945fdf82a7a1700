"""A deterministic judge of whether an image shows what a shapes caption says.

No learned model: the background colour is read from the image's outer ring, the foreground is the
largest connected region that differs clearly from it, its colour is the nearest palette colour to
the region's core pixels, and its shape comes from how much of its bounding box it fills
(square 1, circle π/4 ≈ 0.79, upright triangle 1/2). Area and box are measured with sub-pixel
coverage (each pixel counts by how far its colour has moved from the background towards the
shape's), so the ratio stays within ±0.05 of the ideal even for 11-pixel shapes. On the dataset's own images it is right
on every combination (see ``tests/test_train.py``), so its score on generated images measures the
generator, not the judge.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .dataset import COLORS, SHAPES, Combination

__all__ = ["Analysis", "analyze", "parse_caption", "score", "shape_mask"]

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")

# A pixel belongs to the foreground when it is more than half-way (in RGB distance) from the
# background colour to the typical foreground pixel: anti-aliased edges then count half in,
# half out, so the region's area matches the drawn shape's area.
_FOREGROUND_FRACTION = 0.5
# Below this RGB distance from the background nothing is taken to be drawn at all.
_MIN_CONTRAST = 40.0
# Fill-ratio thresholds about half-way between the ideal ratios (1/2, π/4, 1); on the dataset's
# 32-px images triangles measure 0.52-0.59 (the apex column is thin), circles 0.78-0.79.
_TRIANGLE_BELOW = 0.67
_SQUARE_ABOVE = 0.89


@dataclass(frozen=True)
class Analysis:
    """What the analyzer sees in an image. ``shape`` is "none" when nothing stands out."""

    color: str
    shape: str
    background: str
    fill_ratio: float
    area_fraction: float


def _nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (breadth-first search; images are small)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in the four axis directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _foreground(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Pixels, background colour, each pixel's distance from it, the contrast, and the shape's region (None: no shape)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {pixels.shape}")
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(ring, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    # The typical foreground pixel's distance: a high percentile, robust to a few stray pixels.
    contrast = float(np.percentile(distance, 99))
    if contrast < _MIN_CONTRAST:
        return pixels, background_rgb, distance, contrast, None
    return pixels, background_rgb, distance, contrast, _largest_component(distance > _FOREGROUND_FRACTION * contrast)


def shape_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """The pixels of the drawn shape as :func:`analyze` finds them (boolean ``[H, W]``; all False if none)."""
    pixels, _, _, _, region = _foreground(image)
    return np.zeros(pixels.shape[:2], dtype=bool) if region is None else region


def analyze(image: Image.Image | np.ndarray) -> Analysis:
    """Read the background colour, the foreground colour and the foreground shape of ``image``."""
    pixels, background_rgb, distance, contrast, region = _foreground(image)
    background = _nearest_color(background_rgb)
    if region is None:
        return Analysis(color="none", shape="none", background=background, fill_ratio=0.0, area_fraction=0.0)
    # The colour from the region's core, away from edges that blend into the background.
    core = region & (distance > 0.8 * contrast)
    color = _nearest_color(np.median(pixels[core if core.any() else region], axis=0))

    # Sub-pixel coverage of the region and its one-pixel rim (the faint side of anti-aliased edges).
    coverage = np.clip(distance / contrast, 0.0, 1.0) * _dilate(region)
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    fill_ratio = float(coverage.sum() / (width * height))
    if fill_ratio < _TRIANGLE_BELOW:
        shape = "triangle"
    elif fill_ratio > _SQUARE_ABOVE:
        shape = "square"
    else:
        shape = "circle"
    return Analysis(
        color=color, shape=shape, background=background, fill_ratio=fill_ratio,
        area_fraction=float(region.mean()),
    )


def parse_caption(caption: str) -> Combination:
    """"a red circle on a blue background" -> Combination("red", "circle", "blue")."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in COLORS:
        raise ValueError(
            f"Not a shapes caption: {caption!r}. Expected 'a <color> <shape> on a <color> background' with "
            f"colors {', '.join(COLORS)} and shapes {', '.join(SHAPES)}."
        )
    return Combination(color=match[1], shape=match[2], background=match[3])


def score(image: Image.Image | np.ndarray, combination: Combination) -> dict[str, bool]:
    """Which parts of ``combination`` the image gets right: color, shape, background, and all three."""
    seen = analyze(image)
    result = {
        "color": seen.color == combination.color,
        "shape": seen.shape == combination.shape,
        "background": seen.background == combination.background,
    }
    result["all"] = all(result.values())
    return result
