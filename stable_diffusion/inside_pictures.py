"""Pictures of the inside of a generation, from what ``inside`` records, and of a sampler's path.

Pure functions of their inputs, for a web UI or a notebook: the denoising strip (x_t above x̂0 at
the recorded steps), heat maps over an image (where guidance pushes, which word painted which
pixel), and the σ's each sampler visits drawn over the training schedule's σ(t).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from .inside import GuidanceMap, Snapshot, WordMap
from .samplers import SAMPLERS, plan_sampling
from .schedules import TIMESTEP_SPACINGS, SchedulerConfig, alphas_cumprod_from_config, sigmas_from_alphas_cumprod

__all__ = [
    "SamplerPath",
    "attention_overlays",
    "guidance_strip",
    "heat_overlay",
    "sampler_path_figure",
    "sampler_paths",
    "trajectory_strip",
]

# Small images (the bundled 32-px model's) are enlarged to this side in strips, pixels kept sharp.
MIN_CELL_SIDE = 128
_LABEL_HEIGHT = 30
_ROW_LABEL_WIDTH = 96


def heat_overlay(
    image: Image.Image, heat: np.ndarray, *, vmax: float | None = None, alpha: float = 0.6, colormap: str = "inferno"
) -> Image.Image:
    """``heat`` ``[H, W]`` (≥ 0) in a colour map, blended over ``image`` in grey; ``vmax`` is full colour (default: its maximum)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D array [H, W], got shape {heat.shape}.")
    if heat.shape != (image.height, image.width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(image.size, Image.BILINEAR))
    scale = float(heat.max()) if vmax is None else vmax
    colours = matplotlib.colormaps[colormap](np.clip(heat / scale if scale > 0 else heat * 0, 0, 1))[..., :3]
    # The picture in grey, so that the heat's colours are not confused with its own.
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    blended = (1 - alpha) * grey + alpha * 255 * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def attention_overlays(image: Image.Image, maps: Sequence[WordMap]) -> list[tuple[Image.Image, str]]:
    """One overlay per prompt token, captioned with its text (a ``gr.Gallery`` value).

    Each map is stretched from its minimum to its maximum: a word that every pixel attends to
    a little has a high floor, and the overlay shows where it is more than that.
    """
    return [(heat_overlay(image, word_map - word_map.min()), text) for text, word_map in maps]


def guidance_strip(image: Image.Image, maps: Sequence[GuidanceMap], *, shared_scale: bool = False) -> Image.Image:
    """The final ``image`` under each step's guidance map, labelled with the map's maximum.

    Each map has its own colour scale (where guidance pushes at that step), or with
    ``shared_scale`` one scale for all (when it pushes hardest).
    """
    if not maps:
        raise ValueError("No guidance maps to draw: ask for guidance_maps with a guidance scale above 1.")
    vmax = max(float(m.difference.max()) for m in maps) if shared_scale else None
    cells = [heat_overlay(image, m.difference, vmax=vmax) for m in maps]
    labels = [f"{_step_label(m.step, m.sigma, m.timestep)}, max {float(m.difference.max()):.2g}" for m in maps]
    return _sheet([cells], labels, row_labels=["|ε̂c − ε̂u|"])


def trajectory_strip(snapshots: Sequence[Snapshot]) -> Image.Image:
    """Two rows for the recorded steps: the noisy x_t the network saw, and its prediction x̂0."""
    if not snapshots:
        raise ValueError("No steps to draw: ask for a trajectory (e.g. trajectory=6).")
    rows = [[s.noisy for s in snapshots], [s.denoised for s in snapshots]]
    labels = [_step_label(s.step, s.sigma, s.timestep) for s in snapshots]
    return _sheet(rows, labels, row_labels=["noisy x_t", "predicted x̂0"])


def _step_label(step: int, sigma: float, timestep: float) -> str:
    return f"step {step + 1}, t={timestep:.0f}\nσ={sigma:.3g}"


def _sheet(rows: list[list[Image.Image]], labels: Sequence[str], *, row_labels: Sequence[str]) -> Image.Image:
    """Rows of same-size images under column labels, each row named on its left."""
    width, height = rows[0][0].size
    scale = max(1, -(-MIN_CELL_SIDE // min(width, height)))
    cell_w, cell_h = width * scale, height * scale
    sheet = Image.new("RGB", (_ROW_LABEL_WIDTH + cell_w * len(labels), _LABEL_HEIGHT + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    # DejaVu Sans (shipped with matplotlib) has the Greek letters and the hat of the labels.
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)
    for column, label in enumerate(labels):
        draw.multiline_text((_ROW_LABEL_WIDTH + column * cell_w + 3, 2), label, fill="black", font=font)
    for row, (images, name) in enumerate(zip(rows, row_labels, strict=True)):
        top = _LABEL_HEIGHT + row * cell_h
        draw.text((4, top + cell_h // 2 - 6), name, fill="black", font=font)
        for column, image in enumerate(images):
            sheet.paste(image.resize((cell_w, cell_h), Image.NEAREST), (_ROW_LABEL_WIDTH + column * cell_w, top))
    return sheet


# ------------------------------------------------------------------------------------ sampler paths
@dataclass(frozen=True)
class SamplerPath:
    """The steps of one sampling plan: the network's timestep and the σ of each (the final σ left out)."""

    label: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def sampler_paths(config: SchedulerConfig, sampler: str, steps: int) -> list[SamplerPath]:
    """Where ``sampler`` goes in ``steps`` steps under each timestep spacing, and with Karras σ's.

    The spacings ("leading", "trailing", "linspace") override the model's ``timestep_spacing``;
    the Karras row is the Karras sampler of the same family (Euler's or DPM-Solver's), run with
    the model's own config. LCM lays out its own schedule: one row. The plans are exactly those a
    generation runs (``samplers.plan_sampling``).
    """
    plan = plan_sampling(config, sampler, steps)  # checks the sampler and the steps
    spec = SAMPLERS[sampler]
    if spec.layout == "lcm":
        return [SamplerPath(sampler, plan.timesteps, plan.sigmas[:-1])]
    family = [name for name, other in SAMPLERS.items() if other.layout == spec.layout]
    plain = next(name for name in family if not SAMPLERS[name].karras)
    paths = []
    for spacing in TIMESTEP_SPACINGS:
        spaced = plan_sampling(dataclasses.replace(config, timestep_spacing=spacing), plain, steps)
        paths.append(SamplerPath(spacing, spaced.timesteps, spaced.sigmas[:-1]))
    karras = [name for name in family if SAMPLERS[name].karras]
    if karras:
        karras_plan = plan_sampling(config, karras[0], steps)
        paths.append(SamplerPath("Karras σ's", karras_plan.timesteps, karras_plan.sigmas[:-1]))
    return paths


def sampler_path_figure(config: SchedulerConfig, paths: Sequence[SamplerPath], *, title: str = "") -> Figure:
    """The training schedule's σ(t) with the steps of each path on it, and σ against the step index."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_from_config(config))
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    on_curve, by_step = figure.subplots(1, 2)
    on_curve.plot(np.arange(len(sigmas)), sigmas.numpy(), color="0.6", linewidth=1.5, label="σ(t), training")
    markers = ("o", "s", "^", "D", "v")
    for index, path in enumerate(paths):
        marker = markers[index % len(markers)]
        size = 90 - 15 * index  # larger markers behind smaller ones, so that coinciding steps stay visible
        on_curve.scatter(path.timesteps.numpy(), path.sigmas.numpy(), s=size, marker=marker, facecolors="none",
                         edgecolors=f"C{index}", linewidths=1.5, label=path.label)
        by_step.plot(np.arange(1, len(path.sigmas) + 1), path.sigmas.numpy(), marker=marker, color=f"C{index}",
                     label=path.label)
    for axes in (on_curve, by_step):
        axes.set_yscale("log")
        axes.set_ylabel("σ (noise level of x̃ = x0 + σ·ε)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    on_curve.set_xlabel("timestep t")
    on_curve.set_title("the steps on the training schedule")
    by_step.set_xlabel("step")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    by_step.set_xlim(0.5, max(len(path.sigmas) for path in paths) + 0.5)  # whole steps, even for one
    by_step.set_title("σ at each step")
    if title:
        figure.suptitle(title)
    return figure
