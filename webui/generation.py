"""The generation tabs (text to image, image to image): one builder, one streaming loop.

A request runs in a worker thread; its live previews stream to the page while it samples, then
the finished PNG files (with their parameters chunk) fill the gallery. The page's settings
become a ``GenerationRequest``, the one type every door of the package speaks.
"""

from __future__ import annotations

import logging
import math
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from stable_diffusion.images import grid, save_png
from stable_diffusion.pipelines import Generation, GenerationCancelled, StableDiffusion
from stable_diffusion.request import GenerationRequest
from stable_diffusion.samplers import SAMPLERS

from .errors import RequestError, user_error
from .inputs import CheckedDropdown, CheckedImage, CheckedNumber, CheckedSlider
from .inside_views import DEFAULT_STEPS_SHOWN, InsideOptions, InsideViews, Recorded, enlarged, observers
from .jobs import Job
from .models import lora_names, recommended
from .served import ServedModel, gpu

__all__ = [
    "GENERATION_CONCURRENCY", "MAX_IMAGES", "MAX_STEPS", "Controls", "generation_tab", "result_components",
    "stream_generation", "with_lora_tag",
]

logger = logging.getLogger(__name__)

# Server-side limits: the API can be called without the page, so the components' bounds (which
# Gradio checks on the server) and the pipeline's own checks are the real guard, not the sliders.
MAX_STEPS = 100
MAX_IMAGES = 4
# One model, one device: generations run one at a time and the rest wait in the queue. Running two
# at once on one GPU or CPU would only split its throughput and double the peak memory.
GENERATION_CONCURRENCY = 1
# Live previews of small models are tiny (32 px for the bundled one): shown at least this large.
PREVIEW_SIDE = 256
# The status while the finished images are written as PNG files and sent.
SAVING = "Finished: saving the PNG files"
# How often a request that waits for the model looks at what it waits for, to tell the page.
WAIT_POLL_S = 0.5
DECODER_CHOICES = [("Full VAE", "full"), ("Tiny (TAESD)", "tiny")]
# The weight "Insert" writes into a LoRA tag: the web UIs' habit, a style that does not take over.
LORA_WEIGHT = 0.8


class Controls:
    """The settings both generation tabs share, in the order their endpoints take them.

    Their defaults and bounds are those of the served model (``models.recommended``: few-step
    models start at 1 step without guidance); ``updates`` gives the page another model's, and
    after a switch the components' own bounds, which API calls are checked against, follow.
    """

    def __init__(self, served: ServedModel, *, prefix: str, auto_size: bool, placeholder: str) -> None:
        pipe = served.pipe
        settings = recommended(pipe)
        bounds = _bounds(pipe, auto_size=auto_size)
        size_info = "0 and 0: the input's shape at the native size" if auto_size else None
        self.auto_size = auto_size
        self.prompt = gr.Textbox(value="", label="Prompt", lines=2, placeholder=placeholder, elem_id=f"{prefix}-prompt")
        self.negative_prompt = gr.Textbox(value="", label="Negative prompt", lines=1, elem_id=f"{prefix}-negative-prompt")
        self._lora_list(served, prefix=prefix)
        # Two settings a row: at half the page's width each label fits on one line and the
        # dropdown shows the longest sampler name whole.
        with gr.Row():
            self.sampler = CheckedDropdown([(spec.label, name) for name, spec in SAMPLERS.items()],
                                           value=settings.sampler, label="Sampler", elem_id=f"{prefix}-sampler")
            self.steps = CheckedSlider(1, MAX_STEPS, value=settings.steps, step=1, precision=0, label="Steps",
                                       elem_id=f"{prefix}-steps")
        with gr.Row():
            self.guidance_scale = CheckedSlider(0, 20, value=settings.guidance_scale, step=0.5,
                                                label="Guidance scale (CFG)", elem_id=f"{prefix}-guidance-scale")
            self.num_images = CheckedSlider(1, bounds["max_images"], value=1, step=1, precision=0,
                                            label="Number of images", elem_id=f"{prefix}-num-images")
        with gr.Row():
            self.width = CheckedSlider(bounds["smallest"], bounds["largest"], value=bounds["size"], step=8, precision=0,
                                       label="Width", info=size_info, elem_id=f"{prefix}-width")
            self.height = CheckedSlider(bounds["smallest"], bounds["largest"], value=bounds["size"], step=8,
                                        precision=0, label="Height", info=size_info, elem_id=f"{prefix}-height")
        with gr.Row(elem_classes=["bottom-aligned"]):
            self.seed = CheckedNumber(value=-1, precision=0, minimum=-1, label="Seed (-1: random)",
                                      info="image i of a request uses seed + i", elem_id=f"{prefix}-seed", scale=3)
            self.random_seed = gr.Button("Random seed", scale=1)
        self.decoder = CheckedDropdown(DECODER_CHOICES, value=settings.decoder, label="Decoder",
                                       visible=pipe is not None and pipe.tiny_vae is not None,
                                       info="the tiny one is about 18x cheaper, a little less sharp",
                                       elem_id=f"{prefix}-decoder")
        self.random_seed.click(lambda: -1, outputs=self.seed, api_visibility="private", queue=False)
        served.switched.append(self.follow)

    def inputs(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance_scale,
                self.width, self.height, self.seed, self.num_images]

    def updates(self, pipe: StableDiffusion | None, *, placeholder: str) -> dict[gr.components.Component, Any]:
        """What the page shows for ``pipe``: its recommended settings, size bounds and decoders."""
        settings = recommended(pipe)
        bounds = _bounds(pipe, auto_size=self.auto_size)
        size = {} if self.auto_size else {"value": bounds["size"]}
        return {
            self.prompt: gr.update(placeholder=placeholder),
            self.sampler: settings.sampler,
            self.steps: settings.steps,
            self.guidance_scale: settings.guidance_scale,
            self.num_images: gr.update(maximum=bounds["max_images"]),
            self.width: gr.update(minimum=bounds["smallest"], maximum=bounds["largest"], **size),
            self.height: gr.update(minimum=bounds["smallest"], maximum=bounds["largest"], **size),
            self.decoder: gr.update(value=settings.decoder, visible=pipe is not None and pipe.tiny_vae is not None),
        }

    def updated(self) -> list[gr.components.Component]:
        """The components ``updates`` changes (an event's outputs)."""
        return list(self.updates(None, placeholder=""))

    def follow(self, pipe: StableDiffusion) -> None:
        """Give the components the bounds of ``pipe``, the model just switched to.

        Gradio checks a request against the components of its session: those the page has
        updated, or else these, which every API client's session shares.
        """
        bounds = _bounds(pipe, auto_size=self.auto_size)
        self.num_images.maximum = bounds["max_images"]
        for side in (self.width, self.height):
            side.minimum, side.maximum = bounds["smallest"], bounds["largest"]

    def _lora_list(self, served: ServedModel, *, prefix: str) -> None:
        """The LoRAs of the server's LoRA folders; "Insert" adds ``<lora:NAME:0.8>`` to the prompt."""
        dirs = () if served.pipe is None else tuple(served.pipe.lora_dirs)
        names = lora_names(dirs)
        folders = ", ".join(f"{Path(folder).name}/" for folder in dirs)
        with gr.Row(visible=bool(dirs), elem_classes=["bottom-aligned"]):
            self.lora = CheckedDropdown(names, value=names[0] if names else None, label="LoRA",
                                        info=f"the files in {folders}", scale=3, elem_id=f"{prefix}-lora")
            insert = gr.Button("Insert", scale=1, interactive=bool(names), elem_id=f"{prefix}-lora-insert")
            refresh = gr.Button("Refresh list", scale=1, elem_id=f"{prefix}-lora-refresh")

        def refreshed() -> tuple[Any, Any]:
            found = lora_names(dirs)
            return gr.update(choices=found, value=found[0] if found else None), gr.update(interactive=bool(found))

        insert.click(with_lora_tag, inputs=[self.prompt, self.lora], outputs=self.prompt, api_visibility="private",
                     queue=False)
        refresh.click(refreshed, outputs=[self.lora, insert], api_visibility="private", queue=False)


def with_lora_tag(prompt: str, name: str) -> str:
    """``prompt`` with the tag that applies the LoRA ``name`` at the usual weight appended."""
    tag = f"<lora:{name}:{LORA_WEIGHT:g}>"
    return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag


def _bounds(pipe: StableDiffusion | None, *, auto_size: bool) -> dict[str, int]:
    """The sliders' limits for ``pipe``: the size range (the native size by default) and images per request."""
    native = pipe.native_size if pipe is not None else 512
    max_pixels = pipe.max_pixels if pipe is not None else native * native
    # Every width and height the sliders allow together fits the server's pixel budget.
    largest = max(8, math.isqrt(max_pixels) // 8 * 8)
    return {"smallest": 0 if auto_size else min(64, native), "largest": largest,
            "size": 0 if auto_size else min(native, largest),
            "max_images": min(MAX_IMAGES, pipe.max_images) if pipe is not None else MAX_IMAGES}


def generation_tab(served: ServedModel, *, prefix: str, takes_image: bool, examples: list[list[Any]],
                   placeholder: str) -> Controls:
    """One generation tab: its controls (returned, for other tabs to fill), its results, its API endpoint.

    ``takes_image``: image to image (an input image and a strength before the shared settings).
    ``examples``: rows of (prompt, negative prompt), or of (image, prompt, strength) with ``takes_image``.
    """
    if served.pipe is None:
        gr.Markdown(f"**This tab cannot run: no model is loaded.** {served.notice}")
    with gr.Row():
        with gr.Column():
            extra_inputs = _image_inputs(prefix) if takes_image else []
            controls = Controls(served, prefix=prefix, auto_size=takes_image, placeholder=placeholder)
            inside = InsideOptions(prefix=prefix)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", interactive=served.pipe is not None,
                                     elem_id=f"{prefix}-generate")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
        with gr.Column():
            outputs = result_components(prefix)
    views = InsideViews(prefix=prefix)
    if takes_image:  # rows of (image, prompt, strength)
        example_inputs = [extra_inputs[0], controls.prompt, extra_inputs[1]]
    else:  # rows of (prompt, negative prompt)
        example_inputs = [controls.prompt, controls.negative_prompt]
    gr.Examples(examples, inputs=example_inputs, cache_examples=False)
    handler = _image_to_image(served) if takes_image else _text_to_image(served)
    triggers = [generate.click, controls.prompt.submit]
    event = gr.on(triggers, handler, inputs=[*extra_inputs, *controls.inputs(), controls.decoder, *inside.inputs()],
                  outputs=[*outputs, views.recorded], api_name=handler.__name__,
                  concurrency_limit=GENERATION_CONCURRENCY, concurrency_id="model", show_progress_on=[outputs[0]])
    views.wire(triggers, event, outputs[0], api_name=f"{handler.__name__}_inside")
    stop.click(None, cancels=[event], api_visibility="private", queue=False)
    return controls


def _image_inputs(prefix: str) -> list[gr.components.Component]:
    image = CheckedImage(label="Input image", type="pil", sources=["upload", "clipboard"], height=384,
                         elem_id=f"{prefix}-input")
    strength = CheckedSlider(0.05, 1.0, value=0.75, step=0.05, label="Strength",
                             info="how much of the image to redraw: 0 keeps it, 1 ignores it")
    return [image, strength]


def result_components(prefix: str) -> list[gr.components.Component]:
    """The results column: the gallery of PNG files, the live preview and the parameters text.

    A generation's event has one more output after these, the ``InsideViews.recorded`` state.
    """
    gallery = gr.Gallery(label="Results (PNG files carry their parameters)", columns=2, height=512,
                         object_fit="contain", buttons=["download", "fullscreen"], elem_id=f"{prefix}-gallery",
                         elem_classes=["label-above"])
    # PNG, not Gradio's default lossy WebP: the enlarged pixels of a small preview stay sharp.
    preview = gr.Image(label="Live preview of the denoising (predicted x₀)", interactive=False, height=256,
                       format="png", elem_id=f"{prefix}-preview", elem_classes=["label-above"])
    parameters = gr.Textbox(label="Parameters", lines=4, buttons=["copy"])
    return [gallery, preview, parameters]


# ------------------------------------------------------------------------------------ endpoints
def _text_to_image(served: ServedModel) -> Callable[..., Iterator[tuple[Any, ...]]]:
    @gpu
    def text_to_image(prompt: str, negative_prompt: str, sampler: str, steps: int, guidance_scale: float,
                      width: int, height: int, seed: int, num_images: int, decoder: str = "full",
                      show_denoising: bool = False, show_guidance: bool = False, show_word_maps: bool = False,
                      steps_shown: int = DEFAULT_STEPS_SHOWN,
                      progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        settings = dict(negative_prompt=negative_prompt, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                        width=width, height=height, seed=seed, num_images=num_images, decoder=decoder)
        observe = observers(show_denoising, show_guidance, show_word_maps, steps_shown)
        yield from stream_generation(served, prompt, settings, None, progress, observe=observe)

    return text_to_image


def _image_to_image(served: ServedModel) -> Callable[..., Iterator[tuple[Any, ...]]]:
    @gpu
    def image_to_image(image: Image.Image | None, strength: float, prompt: str, negative_prompt: str, sampler: str,
                       steps: int, guidance_scale: float, width: int, height: int, seed: int, num_images: int,
                       decoder: str = "full", show_denoising: bool = False, show_guidance: bool = False,
                       show_word_maps: bool = False, steps_shown: int = DEFAULT_STEPS_SHOWN,
                       progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        if image is None:  # the pipeline would draw from text alone
            raise RequestError("No input image: upload or paste an image to start from.")
        settings = dict(negative_prompt=negative_prompt, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                        width=width or None, height=height or None, seed=seed, num_images=num_images,
                        strength=strength, decoder=decoder)
        observe = observers(show_denoising, show_guidance, show_word_maps, steps_shown)
        yield from stream_generation(served, prompt, settings, image, progress, observe=observe)

    return image_to_image


def _request(prompt: str, settings: dict[str, Any]) -> GenerationRequest:
    """The page's values as a request: sliders give floats, and seed -1 (or nothing) asks for a random one."""
    seed = settings.pop("seed")
    whole = {name: int(value) for name, value in settings.items()
             if name in ("steps", "width", "height", "num_images") and value is not None}
    return GenerationRequest(prompt, **{**settings, **whole, "seed": None if seed in (None, -1) else int(seed)})


# ------------------------------------------------------------------------------------ streaming
def stream_generation(served: ServedModel, prompt: str, settings: dict[str, Any], image: Image.Image | None,
                      progress: gr.Progress, *, mask: Image.Image | None = None,
                      observe: dict[str, Any] | None = None) -> Iterator[tuple[Any, ...]]:
    """Run a generation in a worker thread; yield live previews, then the finished PNG files and what
    the run recorded of its inside (``inside_views.Recorded``, or None).

    ``image``, ``mask`` and the observers ``observe`` (``inside_views.observers``) go to
    ``StableDiffusion.generate`` (image to image, inpainting, the inside views).

    The sampler's callback feeds a queue that this generator drains, so a slow browser never slows
    the sampling (previews it could not show in time are skipped). When Gradio closes the
    generator (the user pressed Stop or went away), ``finally`` sets the cancel event and the
    pipeline stops at its next step. While the request waits for the model behind a job that
    Gradio's queue does not show (the server's warm-up, a REST API request, a model load), the
    page is told what it waits for.
    """
    served.require()
    try:
        request = _request(prompt, settings)
    except ValueError as error:
        raise user_error(error) from None
    updates: queue.Queue = queue.Queue()
    cancel = threading.Event()
    inputs = {"image": image, "mask": mask, **(observe or {})}
    threading.Thread(target=_work, args=(served, request, inputs, updates, cancel), name="generation",
                     daemon=True).start()
    waiting, shown = True, ""
    try:
        while True:
            try:
                update = updates.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                message = _waiting_message(served.queue.running) if waiting else ""
                if message and message != shown:  # say what the request waits for, once per thing
                    shown = message
                    progress(0.0, desc=message)
                    yield gr.skip(), gr.skip(), message, gr.skip()
                continue
            while not updates.empty():  # skip to the newest; "done"/"error" always come last
                update = updates.get_nowait()
            kind, *payload = update
            waiting = False  # every update is sent from the request's own turn, or ends it
            if kind == "turn":
                if shown:
                    yield gr.skip(), gr.skip(), "Generating", gr.skip()  # no longer waiting
                continue
            if kind == "error":
                raise user_error(payload[0])
            if kind == "stopped":  # by POST /sdapi/v1/interrupt: the page's own Stop closes this generator first
                raise RequestError(f"Stopped before the end: {payload[0]}.")
            if kind == "done":
                break
            step, total, preview = payload
            progress((step + 1, total), desc="Denoising", unit="steps")
            yield gr.skip(), gr.skip() if preview is None else preview, f"Step {step + 1} of {total}", gr.skip()
        result: Generation = payload[0]
        # The finished picture in the preview pane as soon as it exists, before its PNG files are
        # written and sent: it stands for the last step's preview where that one was skipped (a
        # 1-step run gets its preview so), and the pane always ends on the result.
        yield gr.skip(), _shown_in_preview(result.images), SAVING, gr.skip()
        with tempfile.TemporaryDirectory(prefix="sd-app-") as folder:
            # Gradio copies the files into its cache while handling this yield, before the folder goes.
            yield (_png_files(result, Path(folder)), gr.skip(), "\n\n".join(result.parameters),
                   Recorded.of(result, request.guidance_scale))
    finally:
        cancel.set()


def _work(served: ServedModel, request: GenerationRequest, inputs: dict[str, Any], updates: queue.Queue,
          cancel: threading.Event) -> None:
    """Run ``request`` with ``inputs`` (``ServedModel.generate``'s image, mask and observers); report to ``updates``."""
    def on_step(step: int, total: int, x0_latents: torch.Tensor) -> None:  # runs in the job's turn: pipe is fixed
        # The last step's preview would be the image itself, decoded twice in a row (a second of a
        # 1-step SD-Turbo run on a CPU): the image comes sooner without it.
        image_next = step + 1 == total and served.pipe.preview_decoder == request.decoder
        preview = None if image_next else _shown_in_preview(served.pipe.preview(x0_latents))
        updates.put(("step", step, total, preview))

    try:
        result = served.generate([request], door="page", callback=on_step, cancel=cancel,
                                 on_turn=lambda: updates.put(("turn",)), **inputs)[0]
        updates.put(("done", result))
    except GenerationCancelled as error:  # the user pressed Stop or left, or an API client interrupted it
        logger.info("Generation stopped: %s", error)
        updates.put(("stopped", error))
    except Exception as error:  # handed to the generator, which reports it on the page
        updates.put(("error", error))


def _shown_in_preview(images: list[Image.Image]) -> Image.Image:
    """The images side by side, as the live preview pane shows them (small ones enlarged)."""
    return enlarged(grid(images), PREVIEW_SIDE)


def _waiting_message(job: Job | None) -> str:
    """What a request waiting for its turn is told about the job running before it ("" when none runs)."""
    if job is None:
        return ""
    if job.door == "warm-up":
        return ("Waiting for the server's warm-up image: its first image on this machine also measures the CPU, "
                "once. Yours comes next.")
    if job.name == "load model":
        return f"Waiting while the server loads the model {job.door}."
    door = {"page": "the page", "api": "the REST API"}.get(job.door, job.door)
    return f"Waiting for the model: another request ({job.name}, via {door}) runs first."


def _png_files(result: Generation, folder: Path) -> list[tuple[str, str]]:
    """The images as PNG files with their parameters chunk, captioned with their seeds."""
    items = []
    for image, seed, parameters in zip(result.images, result.seeds, result.parameters, strict=True):
        path = folder / f"seed-{seed}.png"
        save_png(image, path, parameters)
        items.append((str(path), f"seed {seed}"))
    return items
