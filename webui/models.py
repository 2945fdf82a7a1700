"""The models the app offers, how it loads them, and the settings each kind of model works best with.

The picker on the page and the REST API's ``/sdapi/v1/sd-models`` list the same catalogue: SD 1.5,
SD-Turbo, an LCM-distilled model, the bundled toy model, and the model the app started with. Any
other Hub repo id, local folder or single file can be typed into the picker.

What a model needs (few steps or twenty, guidance or none, which sampler) is read from the loaded
model itself, not from its name: see ``recommended``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from gradio.components import Component

from stable_diffusion.hub import DEFAULT_MODEL, DEFAULT_TINY_VAE, load, model_name
from stable_diffusion.lora import available_loras
from stable_diffusion.pipelines import GenerationCancelled, StableDiffusion
from stable_diffusion.request import GenerationRequest

from .errors import RequestError, user_error
from .served import ServedModel, switch_model

__all__ = [
    "LCM_MODEL",
    "SD_TURBO",
    "KnownModel",
    "ModelLoader",
    "ModelPicker",
    "Recommended",
    "catalogue",
    "default_source",
    "known_models",
    "lora_names",
    "recommended",
    "warm_up",
]

logger = logging.getLogger(__name__)

SD_TURBO = "stabilityai/sd-turbo"
LCM_MODEL = "SimianLuo/LCM_Dreamshaper_v7"
# A source typed into the picker longer than this is refused before it reaches the loader.
MAX_SOURCE_CHARS = 1000


@dataclass(frozen=True)
class KnownModel:
    """A model of the picker's list. ``few_step``: it samples in 1 to 4 steps, so on a CPU decoding
    the image is a large part of its time and it comes with the tiny decoder (TAESD) there.
    ``sd_latents``: its latent space is Stable Diffusion's, which TAESD decodes (the bundled toy
    model has its own)."""

    label: str
    source: str
    few_step: bool = False
    sd_latents: bool = True


def known_models(bundled: Path) -> list[KnownModel]:
    """The picker's models; ``bundled``: the folder of the bundled tiny model (left out if missing)."""
    models = [
        KnownModel("SD 1.5", DEFAULT_MODEL),
        KnownModel("SD-Turbo (1-4 steps)", SD_TURBO, few_step=True),
        KnownModel("LCM Dreamshaper v7 (4 steps)", LCM_MODEL, few_step=True),
    ]
    return models + ([KnownModel("tiny-shapes (bundled, 32 px)", str(bundled), sd_latents=False)]
                     if bundled.is_dir() else [])


def default_source(device: torch.device) -> str:
    """The model to serve when none is asked for: on a CPU SD-Turbo, whose one step (with the tiny
    decoder) gives a visitor an image in seconds; on a GPU SD 1.5, the reference model."""
    return SD_TURBO if device.type == "cpu" else DEFAULT_MODEL


@dataclass(frozen=True)
class ModelLoader:
    """How the app loads any model: where, in what precision, with which tiny decoder and LoRA folders.

    ``tiny_vae``: a TAESD source loaded with every model whose latents are SD's (``--tiny-vae``);
    ``auto_tiny_vae``: without one, the few-step models of ``known`` get TAESD on a CPU.
    """

    device: torch.device
    dtype: torch.dtype
    tiny_vae: str | None = None
    auto_tiny_vae: bool = True
    lora_dirs: tuple[Path, ...] = ()
    known: tuple[KnownModel, ...] = ()

    def tiny_vae_for(self, source: str) -> str | None:
        model = next((known for known in self.known if known.source == source), None)
        if model is not None and not model.sd_latents:
            return None
        if self.tiny_vae is not None:
            return self.tiny_vae
        few_step = model is not None and model.few_step
        return DEFAULT_TINY_VAE if self.auto_tiny_vae and few_step and self.device.type == "cpu" else None

    def __call__(self, source: str, *, device: torch.device | str | None = None) -> StableDiffusion:
        """Load ``source`` (on ``device`` instead when given: "meta" checks a model without its memory)."""
        return load(source, device=device or self.device, dtype=self.dtype, tiny_vae=self.tiny_vae_for(source),
                    lora_dirs=self.lora_dirs)


def catalogue(served_source: str | None, known: Sequence[KnownModel]) -> dict[str, str]:
    """Every model the server offers, by title -> source: the one it started with, then ``known``."""
    sources = ([served_source] if served_source is not None else []) + [model.source for model in known]
    found: dict[str, str] = {}
    for source in sources:
        found.setdefault(model_name(source), source)
    return found


def lora_names(dirs: Sequence[str | os.PathLike]) -> list[str]:
    """The LoRAs a prompt tag can name, from ``dirs`` (a name with ':', '<' or '>' cannot be written in a tag)."""
    return sorted(name for name in available_loras(dirs) if not set(name) & set(":<>"))


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Recommended:
    """The defaults the page offers for a kind of model; ``kind`` is said in the page header."""

    kind: str
    sampler: str
    steps: int
    guidance_scale: float
    decoder: str = "full"


STANDARD = Recommended("", "dpmpp_2m_karras", 20, 7.5)
# Adversarial diffusion distillation (SD-Turbo, Sauer et al. 2023): one step from pure noise, no
# guidance. Its scheduler config spaces steps "trailing", so that step starts at t = 999.
FEW_STEP = Recommended("few-step", "euler_a", 1, 0.0)
# Latent consistency models (Luo et al. 2023): the LCM sampler in 2 to 8 steps. A guidance-distilled
# UNet takes the guidance weight as an input (LCM Dreamshaper v7 was distilled around w = 8); an
# LCM scheduler on a plain UNet (the LCM-LoRA fused in) wants no guidance.
LCM_DISTILLED = Recommended("latent consistency", "lcm", 4, 8.0)
LCM_PLAIN = Recommended("latent consistency", "lcm", 4, 1.0)


def recommended(pipe: StableDiffusion | None) -> Recommended:
    """The settings ``pipe`` works best with, read from the model: its UNet's guidance input
    (``time_cond_proj_dim``), an LCM scheduler config (``original_inference_steps``), or SD-Turbo's
    trailing ε-schedule. Few-step models decode with the tiny decoder when it is loaded."""
    if pipe is None:
        return STANDARD
    scheduler = pipe.scheduler
    if pipe.unet.config.time_cond_proj_dim is not None:
        settings = LCM_DISTILLED
    elif scheduler.original_inference_steps is not None:
        settings = LCM_PLAIN
    elif (scheduler.timestep_spacing == "trailing" and scheduler.prediction_type == "epsilon"
          and not scheduler.rescale_betas_zero_snr):
        # Zero-terminal-SNR models also space "trailing", but they predict v.
        settings = FEW_STEP
    else:
        return STANDARD
    if pipe.tiny_vae is not None:
        return dataclasses.replace(settings, decoder="tiny")
    return settings


def warm_up(served: ServedModel) -> None:
    """One 1-step image at the served model's native size and recommended settings, in its queue.

    What only the first image on a machine pays is then paid before a visitor asks: on a CPU, the
    timing of each new convolution shape (``stable_diffusion.cpu_conv``: a first 512² SD-Turbo image
    took 25 s instead of 11 s) and oneDNN's kernel builds. A server calls this once at start-up (a
    Space's container starts with an empty cache); a request that arrives meanwhile waits for its
    turn. A failure is logged, not raised: the server serves without it.
    """
    pipe = served.pipe
    if pipe is None:
        return
    settings = recommended(pipe)
    request = GenerationRequest("", steps=1, sampler=settings.sampler, guidance_scale=settings.guidance_scale,
                                decoder=settings.decoder, seed=0)
    start = time.perf_counter()
    try:
        served.generate([request], door="warm-up")
    except GenerationCancelled:
        logger.info("Warm-up interrupted")
    except Exception:
        logger.exception("Warm-up image failed (the server serves anyway)")
    else:
        logger.info("Warmed up: a %dx%d image of %s in %.1f s", pipe.native_size, pipe.native_size, pipe.name,
                    time.perf_counter() - start)


# ------------------------------------------------------------------------------------ the picker
class ModelPicker:
    """The page's header (what is served, from ``header(served)``) and model picker: the catalogue's
    models, or any source typed in, and a Load button.

    Loading goes through ``served.switch_model``'s queue turn; the page then shows the new model's
    settings (``wire``'s ``page``). A page opened after someone else switched models gets them
    when it loads.
    """

    def __init__(self, served: ServedModel, known: Sequence[KnownModel], *,
                 header: Callable[[ServedModel], str]) -> None:
        self.served = served
        self.header_text = header
        self.sources = catalogue(served.source, known)
        labels = {model_name(model.source): model.label for model in known}
        self.header = gr.Markdown(header(served), elem_id="header")
        with gr.Row(elem_classes=["bottom-aligned"]):
            self.dropdown = gr.Dropdown(
                [(labels.get(title, title), title) for title in self.sources], value=self._served_title(),
                allow_custom_value=True, label="Model", scale=4, elem_id="model-picker",
                info="one of these, or type a Hub repo id, a local diffusers folder or a .safetensors file")
            self.button = gr.Button("Load model", scale=1, elem_id="model-load")

    def wire(self, demo: gr.Blocks, page: Callable[[StableDiffusion | None], dict[Component, Any]],
             outputs: list[Component]) -> None:
        """Connect the Load button and the page's refresh when it opens; ``page(pipe)``: the updates
        of ``outputs`` that show ``pipe``.

        The API's ``/load_model`` takes a model (a title of the list, or a source) and returns the
        title and header of the model served after it.
        """
        built = self._served_title()

        def load_model(model: str, progress: gr.Progress = gr.Progress()) -> tuple[str | None, str]:
            source = self._source(model)
            if source == self.served.source and self.served.pipe is not None:
                gr.Info(f"{model} is the model served already.")
            else:
                progress(0.0, desc=f"Loading {model}")
                self._switch(model, source)
            return self._served_title(), self.header_text(self.served)

        def refresh() -> dict[Component, Any]:
            if self._served_title() == built:  # the page as built shows this model
                return {component: gr.skip() for component in [self.dropdown, self.header, *outputs]}
            return {self.dropdown: self._served_title(), self.header: self.header_text(self.served),
                    **page(self.served.pipe)}

        event = self.button.click(load_model, inputs=self.dropdown, outputs=[self.dropdown, self.header],
                                  api_name="load_model", show_progress_on=[self.dropdown])
        event.success(lambda: page(self.served.pipe), outputs=outputs, api_visibility="private", queue=False)
        demo.load(refresh, outputs=[self.dropdown, self.header, *outputs], api_visibility="private", queue=False)

    def _served_title(self) -> str | None:
        return None if self.served.pipe is None else self.served.pipe.name

    def _source(self, model: object) -> str:
        """The source of a title the picker shows, or a source typed in."""
        if not isinstance(model, str) or not model.strip() or len(model) > MAX_SOURCE_CHARS:
            shown = repr(model) if len(repr(model)) <= 40 else repr(model)[:37] + "..."
            raise RequestError(f"Model must be one of {', '.join(self.sources)}, or a Hub repo id, a local folder or "
                               f"a .safetensors file of at most {MAX_SOURCE_CHARS} characters; got {shown}.")
        # The title the picker shows for the served model, which may have been typed in as a path.
        served = {self._served_title(): self.served.source} if self.served.source is not None else {}
        return {**self.sources, **served}.get(model.strip(), model.strip())

    def _switch(self, model: str, source: str) -> None:
        try:
            switch_model(self.served, source)
        except Exception as error:
            shown = user_error(error)  # a fault of ours (not the model's) is logged with its traceback
            if not isinstance(shown, RequestError):
                raise
            now = self.served.pipe
            still = f"Still serving {now.name}." if now is not None else self.served.notice
            raise RequestError(f"Could not load {model}: {shown.message} {still}") from None
        logger.info("Now serving %s", self.served.pipe.name)
