"""A captioned toy dataset drawn on the fly: one coloured shape on a coloured background.

Each image shows a circle, a square or a triangle in one of eight colours, at a random size and
position, on a background of another of the eight colours, captioned "a red circle on a blue
background". It is small enough to train a whole latent diffusion model on a CPU, and simple
enough to score prompt-following with a deterministic analyzer (``tiny_shapes.scoring``).

Some colour-shape-background combinations never appear in training (``HELD_OUT``): a model that
draws them right has learned to compose the words, not to recall the pictures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from stable_diffusion.images import pil_to_tensor

__all__ = [
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "Combination",
    "Scene",
    "ShapesDataset",
    "all_combinations",
    "draw_scene",
    "random_scene",
    "split_combinations",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Far apart in RGB (every pair is more than 100 apart), so the colour of a blurry generated shape
# still has one clear nearest name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

Split = Literal["train", "held_out", "all"]
SPLITS = ("train", "held_out", "all")

# Shape side (or diameter) as a fraction of the image side, and the empty border kept around it
# so the image's outer ring is background (the analyzer reads the background colour there).
MIN_SIZE, MAX_SIZE = 0.35, 0.7
MARGIN = 0.06
SUPERSAMPLING = 4  # drawn at 4× and downscaled: anti-aliased edges, like a photographed shape


@dataclass(frozen=True, order=True)
class Combination:
    """What a caption says: the shape, its colour and the background colour."""

    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class Scene:
    """A combination drawn at a place: centre and size as fractions of the image side."""

    combination: Combination
    center_x: float
    center_y: float
    size: float


# Twelve of the 168 combinations (7%), never shown in training. Every shape appears four times,
# every colour at least once as a shape and once as a background, so each word is still trained.
HELD_OUT: tuple[Combination, ...] = tuple(
    Combination(color, shape, background)
    for color, shape, background in (
        ("red", "circle", "blue"),
        ("orange", "square", "purple"),
        ("yellow", "triangle", "black"),
        ("green", "circle", "white"),
        ("blue", "square", "yellow"),
        ("purple", "triangle", "green"),
        ("white", "circle", "red"),
        ("black", "square", "orange"),
        ("red", "triangle", "yellow"),
        ("blue", "circle", "orange"),
        ("green", "square", "black"),
        ("white", "triangle", "purple"),
    )
)


def all_combinations() -> list[Combination]:
    """Every shape in every colour on every other colour (3 × 8 × 7 = 168), in a fixed order."""
    return [
        Combination(color, shape, background)
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if background != color
    ]


def split_combinations(split: Split) -> list[Combination]:
    """The combinations of a split: "train" (all but ``HELD_OUT``), "held_out", or "all"."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    if split == "all":
        return all_combinations()
    held_out = set(HELD_OUT)
    if split == "held_out":
        return list(HELD_OUT)
    return [c for c in all_combinations() if c not in held_out]


def random_scene(rng: random.Random, combinations: list[Combination]) -> Scene:
    """A uniformly chosen combination at a uniformly random size and position inside the margin."""
    combination = rng.choice(combinations)
    size = rng.uniform(MIN_SIZE, MAX_SIZE)
    low, high = MARGIN + size / 2, 1 - MARGIN - size / 2
    return Scene(combination, center_x=rng.uniform(low, high), center_y=rng.uniform(low, high), size=size)


def draw_scene(scene: Scene, resolution: int) -> Image.Image:
    """Render ``scene`` as an RGB image ``resolution`` pixels square."""
    big = resolution * SUPERSAMPLING
    image = Image.new("RGB", (big, big), COLORS[scene.combination.background])
    draw = ImageDraw.Draw(image)
    half = scene.size * big / 2
    cx, cy = scene.center_x * big, scene.center_y * big
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    fill = COLORS[scene.combination.color]
    shape = scene.combination.shape
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        # Upright, apex at the top centre, base along the bottom of the box.
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}: choose one of {', '.join(SHAPES)}.")
    return image.resize((resolution, resolution), Image.BOX)


class ShapesDataset(Dataset):
    """``length`` random scenes of one split; item ``i`` is the same picture every time (seeded by ``seed`` and ``i``).

    Each item is ``{"pixels": [3, H, W] in [-1, 1], "caption": str}``. Because items are already
    random draws, reading them in order is as good as shuffling, and resuming at batch ``n`` gives
    the batches an uninterrupted run would have seen.
    """

    def __init__(self, *, resolution: int = 32, split: Split = "train", length: int = 10_000_000, seed: int = 0) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        self.resolution = resolution
        self.combinations = split_combinations(split)
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return random_scene(random.Random(self.seed * 1_000_003 + index), self.combinations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        scene = self.scene(index)
        image = draw_scene(scene, self.resolution)
        return {"pixels": pil_to_tensor(image), "caption": scene.combination.caption}
