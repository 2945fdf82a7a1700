"""The noise-schedule tab: the forward process q(x_t | x_0), drawn from the package's schedule functions,
and the steps each sampler takes over the served model's schedule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

import stable_diffusion
from stable_diffusion import schedules
from stable_diffusion.images import checked_image, pil_to_tensor, tensor_to_pil
from stable_diffusion.inside_pictures import sampler_path_figure, sampler_paths
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.samplers import SAMPLERS

from .errors import RequestError, user_error
from .generation import GENERATION_CONCURRENCY
from .inputs import CheckedCheckbox, CheckedCheckboxGroup, CheckedDropdown, CheckedImage, CheckedNumber, CheckedSlider
from .models import recommended
from .served import ServedModel, gpu

__all__ = ["MAX_PATH_STEPS", "SCHEDULE_BETAS", "SamplerPaths", "noise_tab"]

# The noise tab's schedules, with the β range each was published with: DDPM's linear (Ho et al.
# 2020, §4), the latent diffusion models' scaled linear (Rombach et al. 2022), and the cosine
# schedule (Nichol & Dhariwal 2021, eq. 17), which needs no range.
SCHEDULE_BETAS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {},
}
DEFAULT_TIMESTEPS = "0, 100, 250, 500, 750, 999"
NOISE_IMAGE_SIDE = 256
MAX_PATH_STEPS = 50
# The sampler paths follow the served model's scheduler config, or SD 1.5's without a model.
SD15_SCHEDULER = Path(stable_diffusion.__file__).parent / "assets" / "configs" / "sd15" / "scheduler" / \
    "scheduler_config.json"


def noise_tab(served: ServedModel, examples: list[str], examples_dir: Path) -> SamplerPaths:
    """The tab: schedule curves, an image noised in pixel space and in the VAE's latent space, and the
    sampler paths (returned: the model picker updates them)."""
    gr.Markdown(
        "The forward process q(x_t | x_0) = N(√ᾱ_t·x_0, (1−ᾱ_t)·I) (Ho et al. 2020, eq. 4) for a few β "
        "schedules. Dashed lines: the same schedule rescaled to zero terminal SNR (Lin et al. 2023)."
    )
    with gr.Row():
        names = CheckedCheckboxGroup(list(SCHEDULE_BETAS), value=list(SCHEDULE_BETAS), label="Schedules to compare")
        zero_snr = CheckedCheckbox(value=False, label="Zero terminal SNR", info="rescale so that ᾱ at t = T−1 is 0")
        num_train_timesteps = CheckedSlider(10, 4000, value=1000, step=10, precision=0, label="Training steps T")
    plot = gr.Plot(_schedule_figure(list(SCHEDULE_BETAS), zero_snr=False, num_train_timesteps=1000),
                   label="Schedules", elem_id="noise-plot", elem_classes=["label-above"])
    with gr.Row():
        with gr.Column():
            image = CheckedImage(label="Image to noise", type="pil", sources=["upload", "clipboard"], height=256,
                                 value=str(examples_dir / examples[0]))
            gr.Examples([[str(examples_dir / path)] for path in examples], inputs=[image], cache_examples=False)
        with gr.Column():
            strip_schedule = CheckedDropdown(list(SCHEDULE_BETAS), value="scaled_linear", label="Schedule for the images")
            timesteps = gr.Textbox(value=DEFAULT_TIMESTEPS, label="Timesteps t (comma separated, 0 to T−1)")
            seed = CheckedNumber(value=0, precision=0, minimum=0, maximum=2**32 - 1, label="Noise seed")
            noise = gr.Button("Noise the image", variant="primary", elem_id="noise-run")
    pixels = gr.Gallery(label="Noised in pixel space: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε", columns=6, height=240,
                        object_fit="contain", format="png", elem_id="noise-pixels",
                        elem_classes=["label-above"])
    latents = gr.Gallery(label="What latent diffusion sees: VAE-encoded, noised in latent space, decoded",
                         columns=6, height=240, object_fit="contain", format="png",
                         elem_id="noise-latents", elem_classes=["label-above"])
    if served.pipe is None:
        gr.Markdown("*The latent-space strip needs a model, and none is loaded; the pixel-space strip works.*")

    def schedule_plot(names: list[str], zero_snr: bool, num_train_timesteps: int) -> Figure:
        return _schedule_figure(names, zero_snr=zero_snr, num_train_timesteps=int(num_train_timesteps))

    def noise_pixels(image: Image.Image | None, schedule: str, zero_snr: bool, num_train_timesteps: int,
                     timesteps: str, seed: int) -> list[tuple[Image.Image, str]]:
        x0 = _image_tensor(image)
        ts, alphas_bar = _checked_timesteps(timesteps, schedule, zero_snr, int(num_train_timesteps))
        # One ε for every t: the strip follows a single sample of the forward process.
        noise = _noise_like(x0, seed)
        noised = [schedules.q_sample(x0, t, noise, alphas_bar) for t in ts]
        return [(_to_image(x), _caption(t, alphas_bar)) for x, t in zip(noised, ts, strict=True)]

    @gpu
    def noise_latents(image: Image.Image | None, schedule: str, zero_snr: bool, num_train_timesteps: int,
                      timesteps: str, seed: int) -> list[tuple[Image.Image, str]]:
        if served.pipe is None:
            raise RequestError("The latent-space strip needs a model, and none is loaded.")
        x0 = _image_tensor(image)
        ts, alphas_bar = _checked_timesteps(timesteps, schedule, zero_snr, int(num_train_timesteps))
        # In a turn of the model's queue, like every use of the model: never beside a generation
        # from the REST API, nor during a switch of models.
        with served.queue.turn("noise latents", door="page"):
            pipe = served.require()
            z0 = pipe.encode(x0, sample=False).cpu()  # the posterior mean, in the UNet's latent scale
            noise = _noise_like(z0, seed)
            noised = torch.cat([schedules.q_sample(z0, t, noise, alphas_bar) for t in ts])
            decoded = pipe.decode(noised.to(pipe.device))
        return [(picture, _caption(t, alphas_bar)) for picture, t in zip(decoded, ts, strict=True)]

    gr.on([names.change, zero_snr.change, num_train_timesteps.release], schedule_plot,
          inputs=[names, zero_snr, num_train_timesteps], outputs=plot, api_name="schedule_plot")
    noise_inputs = [image, strip_schedule, zero_snr, num_train_timesteps, timesteps, seed]
    noise.click(noise_pixels, inputs=noise_inputs, outputs=pixels, api_name="noise_pixels")
    noise.click(noise_latents, inputs=noise_inputs, outputs=latents, api_name="noise_latents",
                concurrency_limit=GENERATION_CONCURRENCY, concurrency_id="model")
    return SamplerPaths(served)


class SamplerPaths:
    """The section "The sampler's path": the timesteps and σ's a sampler visits in N steps, over σ(t).

    Drawn for the served model's scheduler config (SD 1.5's without a model), under each timestep
    spacing and with Karras σ's (``inside_pictures.sampler_paths``); its endpoint is ``/sampler_paths``.
    """

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        settings = recommended(served.pipe)
        with gr.Column(elem_id="sampler-paths"):
            gr.Markdown(
                "### The sampler's path over the schedule\n"
                "Where a sampler's N steps fall on the training schedule's σ(t), for each way of spacing them: "
                "\"leading\" (DDPM, DDIM and SD 1.5's config), \"trailing\", \"linspace\" (the web UIs' Euler "
                "and DPM++), and Karras σ's. With one step, only \"trailing\" starts from pure noise at t = 999; "
                "the others start from an almost clean image, which is why one-step turbo models space \"trailing\"."
            )
            with gr.Row():
                self.sampler = CheckedDropdown([(spec.label, name) for name, spec in SAMPLERS.items()],
                                               value=settings.sampler, label="Sampler", elem_id="paths-sampler")
                self.steps = CheckedSlider(1, MAX_PATH_STEPS, value=min(settings.steps, MAX_PATH_STEPS), step=1,
                                           precision=0, label="Steps N", elem_id="paths-steps")
            self.plot = gr.Plot(_sampler_path_figure(served.pipe, settings.sampler, settings.steps),
                                label="Sampler paths", elem_id="paths-plot", elem_classes=["label-above"])

        def sampler_paths_plot(sampler: str, steps: int) -> Figure:
            return _sampler_path_figure(self.served.pipe, sampler, int(steps))

        # The user's changes only (the model picker sets its own plot); a drag redraws at the last value.
        gr.on([self.sampler.input, self.steps.input], sampler_paths_plot, inputs=[self.sampler, self.steps],
              outputs=self.plot, api_name="sampler_paths", trigger_mode="always_last")

    def updates(self, pipe: StableDiffusion | None) -> dict[gr.components.Component, Any]:
        """What the section shows for ``pipe``: its recommended sampler and steps, on its schedule."""
        settings = recommended(pipe)
        steps = min(settings.steps, MAX_PATH_STEPS)
        return {self.sampler: settings.sampler, self.steps: steps,
                self.plot: _sampler_path_figure(pipe, settings.sampler, steps)}


def _sampler_path_figure(pipe: StableDiffusion | None, sampler: str, steps: int) -> Figure:
    """The paths of ``sampler`` in ``steps`` steps on the schedule of ``pipe`` (SD 1.5's without one)."""
    if pipe is None:
        config = schedules.SchedulerConfig.from_hub_config(json.loads(SD15_SCHEDULER.read_text()))
        name = "SD 1.5 (no model is loaded)"
    else:
        config, name = pipe.scheduler, pipe.name
    try:
        paths = sampler_paths(config, sampler, steps)
    except ValueError as error:
        raise user_error(error) from None
    spacing = config.timestep_spacing or "none named: each sampler's own default"
    title = (f"{SAMPLERS[sampler].label}, {steps} step{'s' if steps > 1 else ''}, on the schedule of {name} "
             f"(its spacing: {spacing})")
    return sampler_path_figure(config, paths, title=title)


def _betas(name: str, *, zero_snr: bool, num_train_timesteps: int) -> torch.Tensor:
    if name not in SCHEDULE_BETAS:
        raise RequestError(f"Unknown schedule {name!r}: choose one of {', '.join(SCHEDULE_BETAS)}.")
    betas = schedules.make_betas(name, num_train_timesteps, **SCHEDULE_BETAS[name])
    return schedules.rescale_zero_terminal_snr(betas) if zero_snr else betas


def _schedule_figure(names: list[str], *, zero_snr: bool, num_train_timesteps: int) -> Figure:
    """β_t, ᾱ_t, √ᾱ_t against √(1−ᾱ_t), and log-SNR(t) of each schedule, on one figure."""
    if not names:
        raise RequestError(f"Pick at least one schedule: {', '.join(SCHEDULE_BETAS)}.")
    figure = Figure(figsize=(11, 7), layout="constrained")
    beta_ax, alpha_ax, circle_ax, snr_ax = figure.subplots(2, 2).flat
    t = np.arange(num_train_timesteps)
    marks = t[:: max(1, num_train_timesteps // 10)]
    for index, name in enumerate(names):
        color, marker = f"C{index}", "os^"[index % 3]
        variants = [(False, "-")] + ([(True, "--")] if zero_snr else [])
        for rescaled, style in variants:
            betas = _betas(name, zero_snr=rescaled, num_train_timesteps=num_train_timesteps)
            alphas_bar = schedules.alphas_cumprod(betas)
            label = name + (" (zero SNR)" if rescaled else "")
            beta_ax.plot(t, betas.numpy(), style, color=color, label=label)
            alpha_ax.plot(t, alphas_bar.numpy(), style, color=color, label=label)
            # Every schedule runs along the same quarter circle (ᾱ + (1−ᾱ) = 1); the markers, one
            # every tenth of the steps, show how fast each one moves along it.
            signal, noise = alphas_bar.sqrt().numpy(), (1 - alphas_bar).sqrt().numpy()
            circle_ax.plot(noise, signal, style, color=color, label=label)
            circle_ax.plot(noise[marks], signal[marks], marker, color=color, markersize=5,
                           fillstyle="none" if rescaled else "full")
            # log-SNR is -inf where ᾱ = 0 (the last step of a zero-SNR schedule): not drawn.
            snr_ax.plot(t, schedules.log_snr(alphas_bar).numpy(), style, color=color, label=label)
    for ax, title, xlabel in (
        (beta_ax, "β_t (log scale)", "t"),
        (alpha_ax, "ᾱ_t (signal kept)", "t"),
        (circle_ax, "√ᾱ_t against √(1−ᾱ_t), a marker every T/10 steps", "√(1−ᾱ_t): noise scale"),
        (snr_ax, "log SNR(t) = log(ᾱ_t / (1−ᾱ_t))", "t"),
    ):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    beta_ax.set_yscale("log")
    circle_ax.set_ylabel("√ᾱ_t: signal scale")
    circle_ax.set_aspect("equal")
    beta_ax.legend(fontsize="small")
    return figure


def _checked_timesteps(text: str, schedule: str, zero_snr: bool,
                       num_train_timesteps: int) -> tuple[list[int], torch.Tensor]:
    try:
        ts = [int(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        message = f"Timesteps must be whole numbers separated by commas, e.g. {DEFAULT_TIMESTEPS!r}."
        raise RequestError(message) from None
    if not 1 <= len(ts) <= 12:
        raise RequestError("Give between 1 and 12 timesteps, separated by commas.")
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad:
        raise RequestError(f"Timesteps must be from 0 to T−1 = {num_train_timesteps - 1}; got {bad}.")
    betas = _betas(schedule, zero_snr=zero_snr, num_train_timesteps=num_train_timesteps)
    return ts, schedules.alphas_cumprod(betas)


def _noise_like(x: torch.Tensor, seed: int | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed or 0)))


def _caption(t: int, alphas_bar: torch.Tensor) -> str:
    alpha_bar = float(alphas_bar[t])
    return f"t = {t}, ᾱ = {alpha_bar:.3g}"


def _image_tensor(image: Image.Image | None) -> torch.Tensor:
    """The image as [1, 3, H, W] in [-1, 1], its longer side NOISE_IMAGE_SIDE, both sides multiples of 8."""
    try:
        image = checked_image(image, what="image to noise")
    except ValueError as error:
        raise RequestError(str(error)) from None
    scale = NOISE_IMAGE_SIDE / max(image.size)
    size = tuple(max(8, round(side * scale / 8) * 8) for side in image.size)
    return pil_to_tensor(image.resize(size, Image.LANCZOS))[None]


def _to_image(x: torch.Tensor) -> Image.Image:
    # x_t leaves [-1, 1] as noise is added; tensor_to_pil clips, for display only.
    return tensor_to_pil(x)[0]
