"""Gradio demo of the from-scratch Stable Diffusion: text to image, image to image, noise schedules.

Runs as a Hugging Face Space (``python app.py``, which is what a Space runs) or locally::

    python app.py                                   # SD 1.5 from the Hub, best device found
    python app.py --model ./my-model --dtype float32 --port 7861
    python app.py --share --auth alice:secret       # public link: set a password

The page only calls the ``stable_diffusion`` package: the pipelines for the generation tabs and the
schedule functions for the noise tab. Nothing here keeps state between requests, so concurrent
users each get exactly their own settings' result; generation requests queue one at a time on the
single model (see ``GENERATION_CONCURRENCY``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from stable_diffusion import schedules
from stable_diffusion.devices import default_device, default_dtype, parse_dtype
from stable_diffusion.hub import DEFAULT_MODEL, ModelLoadError, load
from stable_diffusion.images import save_png, to_rgb
from stable_diffusion.pipelines import SAMPLER_LABELS, Generation, GenerationCancelled, StableDiffusion
from stable_diffusion.samplers import SAMPLER_NAMES

try:  # Hugging Face ZeroGPU: the decorated calls borrow a GPU; elsewhere a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
TINY_MODEL = HERE / "models" / "tiny-shapes"
TITLE = "Stable Diffusion from scratch"

# Server-side limits: the API can be called without the page, so the components' bounds (which
# Gradio checks on the server) and the pipeline's own checks are the real guard, not the sliders.
MAX_STEPS = 100
MAX_IMAGES = 4
MAX_SIDE = 2048
# One model, one device: generations run one at a time and the rest wait in the queue. Running two
# at once on one GPU or CPU would only split its throughput and double the peak memory.
GENERATION_CONCURRENCY = 1
MAX_QUEUE = 32

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


class RequestError(gr.Error):
    """A bad request: its message is shown to the user, and no traceback clutters the server log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


# ------------------------------------------------------------------------------------ startup
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"Hub repo id, local diffusers folder or single .safetensors file "
                             f"(default: $SD_MODEL, else {DEFAULT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float16 on a GPU, "
                                        "the fastest that keeps the image on a CPU)")
    parser.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="require this login (recommended with --share)")
    return parser


def load_model(source: str, *, device: torch.device, dtype: torch.dtype) -> tuple[StableDiffusion | None, str]:
    """The pipeline to serve, and a note for the page when it is not the one asked for.

    Without the Hub (offline, nothing cached) the app falls back to the bundled tiny model, and
    without that it still starts: the noise tab needs no model.
    """
    try:
        return load(source, device=device, dtype=dtype), ""
    except ModelLoadError as error:
        logger.warning("Could not load %s: %s", source, error)
        reason = f"Could not load `{source}`: {error}"
    if TINY_MODEL.is_dir():
        pipe = load(str(TINY_MODEL), device=device, dtype=dtype)
        return pipe, (f"{reason}\n\nRunning the bundled tiny model `models/tiny-shapes` instead: it draws "
                      "one coloured shape on a coloured background, e.g. *a red circle on a blue background*.")
    return None, (f"{reason}\n\nNo bundled model was found at `models/tiny-shapes` either, so the "
                  "generation tabs cannot run. The noise schedule tab works without a model.")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in (__name__, "stable_diffusion"):
        logging.getLogger(name).setLevel(logging.INFO)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must be USER:PASSWORD, both non-empty")
        auth = (user, password)
    try:
        device = torch.device(args.device) if args.device else default_device()
        dtype = parse_dtype(args.dtype) or default_dtype(device)
    except (RuntimeError, ValueError) as error:
        parser.error(str(error))
    source = args.model or os.environ.get("SD_MODEL") or DEFAULT_MODEL
    pipe, notice = load_model(source, device=device, dtype=dtype)
    demo = build_demo(pipe, notice=notice)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                allowed_paths=[str(EXAMPLES_DIR)], theme=gr.themes.Soft())


# ------------------------------------------------------------------------------------ UI
def build_demo(pipe: StableDiffusion | None, *, notice: str = "") -> gr.Blocks:
    """The whole page, serving ``pipe`` (``None``: only the noise tab can run; ``notice`` says why)."""
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_header(pipe, notice))
        with gr.Tab("Text to image", id="text-to-image"):
            _text_to_image_tab(pipe, notice, examples["text_to_image"])
        with gr.Tab("Image to image", id="image-to-image"):
            _image_to_image_tab(pipe, notice, examples["image_to_image"])
        with gr.Tab("Noise schedule", id="noise-schedule"):
            _noise_tab(pipe, examples["noise_schedule"])
    demo.queue(max_size=MAX_QUEUE)
    return demo


def _header(pipe: StableDiffusion | None, notice: str) -> str:
    lines = [f"# {TITLE}"]
    if pipe is not None:
        lines.append(f"Model **{pipe.name}** on **{pipe.device}** in **{_dtype_name(pipe.dtype)}** "
                     f"(native size {pipe.native_size}×{pipe.native_size}).")
    if notice:
        lines.append(f"> ⚠️ {notice}".replace("\n\n", "\n>\n> "))
    return "\n\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Controls:
    """The settings both generation tabs share, in the order their endpoints take them."""

    def __init__(self, pipe: StableDiffusion | None, *, prefix: str, allow_auto_size: bool) -> None:
        native = pipe.native_size if pipe is not None else 512
        max_pixels = pipe.max_pixels if pipe is not None else native * native
        smallest = min(64, native)
        largest = max(native, min(MAX_SIDE, math.isqrt(max_pixels) * 2 // 8 * 8))
        default_size = 0 if allow_auto_size else native
        size_info = "0 and 0: the input's shape at the native size" if allow_auto_size else None
        self.prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red fox in the snow, photograph",
                                 elem_id=f"{prefix}-prompt")
        self.negative_prompt = gr.Textbox(label="Negative prompt", lines=1, placeholder="blurry, low quality",
                                          elem_id=f"{prefix}-negative-prompt")
        with gr.Row():
            self.sampler = gr.Dropdown([(SAMPLER_LABELS.get(name, name), name) for name in SAMPLER_NAMES],
                                       value="dpmpp_2m_karras", label="Sampler")
            self.steps = gr.Slider(1, MAX_STEPS, value=20, step=1, precision=0, label="Steps",
                                   elem_id=f"{prefix}-steps")
            self.guidance_scale = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale (CFG)")
        with gr.Row():
            # 0 is allowed only in image to image, where 0 x 0 means "the input's shape at the native size".
            self.width = gr.Slider(0 if allow_auto_size else smallest, largest, value=default_size, step=8,
                                   precision=0, label="Width", info=size_info)
            self.height = gr.Slider(0 if allow_auto_size else smallest, largest, value=default_size, step=8,
                                    precision=0, label="Height", info=size_info)
        with gr.Row():
            self.seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed (-1: random)",
                                  info="image i of a request uses seed + i")
            self.random_seed = gr.Button("Random seed", size="sm")
            max_images = min(MAX_IMAGES, pipe.max_images) if pipe is not None else MAX_IMAGES
            self.num_images = gr.Slider(1, max_images, value=1, step=1, precision=0, label="Number of images")
        self.random_seed.click(lambda: -1, outputs=self.seed, api_visibility="private", queue=False)

    def inputs(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance_scale,
                self.width, self.height, self.seed, self.num_images]


def _results(prefix: str) -> tuple[gr.Gallery, gr.Image, gr.Textbox]:
    gallery = gr.Gallery(label="Results (PNG files carry their parameters)", columns=2, height=512,
                         object_fit="contain", buttons=["download", "fullscreen"], elem_id=f"{prefix}-gallery")
    preview = gr.Image(label="Live preview of the denoising (predicted x₀)", interactive=False, height=256,
                       elem_id=f"{prefix}-preview")
    parameters = gr.Textbox(label="Parameters", lines=4, buttons=["copy"])
    return gallery, preview, parameters


def _unavailable(pipe: StableDiffusion | None, notice: str) -> None:
    if pipe is None:
        gr.Markdown(f"**This tab cannot run: no model is loaded.** {notice}")


def _text_to_image_tab(pipe: StableDiffusion | None, notice: str, examples: list[dict]) -> None:
    prefix = "t2i"
    _unavailable(pipe, notice)
    with gr.Row():
        with gr.Column():
            controls = _Controls(pipe, prefix=prefix, allow_auto_size=False)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", interactive=pipe is not None,
                                     elem_id=f"{prefix}-generate")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
        with gr.Column():
            gallery, preview, parameters = _results(prefix)
    gr.Examples([[e["prompt"], e["negative_prompt"]] for e in examples],
                inputs=[controls.prompt, controls.negative_prompt], cache_examples=False)

    @gpu
    def text_to_image(prompt: str, negative_prompt: str, sampler: str, steps: int, guidance_scale: float,
                      width: int, height: int, seed: int, num_images: int,
                      progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, Any, str]]:
        _require(pipe, notice)

        def run(callback, cancel) -> Generation:
            return pipe.text_to_image(
                prompt, negative_prompt, width=int(width), height=int(height), steps=int(steps),
                guidance_scale=float(guidance_scale), sampler=sampler, seed=_seed(seed),
                num_images=int(num_images), callback=callback, cancel=cancel,
            )

        yield from _stream(pipe, run, progress)

    event = gr.on([generate.click, controls.prompt.submit], text_to_image, inputs=controls.inputs(),
                  outputs=[gallery, preview, parameters], api_name="text_to_image",
                  concurrency_limit=GENERATION_CONCURRENCY, concurrency_id="model", show_progress_on=[gallery])
    stop.click(None, cancels=[event], api_visibility="private", queue=False)


def _image_to_image_tab(pipe: StableDiffusion | None, notice: str, examples: list[dict]) -> None:
    prefix = "i2i"
    _unavailable(pipe, notice)
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Input image", type="pil", sources=["upload", "clipboard"], height=384,
                             elem_id=f"{prefix}-input")
            strength = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Strength",
                                 info="how much of the image to redraw: 0 keeps it, 1 ignores it")
            controls = _Controls(pipe, prefix=prefix, allow_auto_size=True)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", interactive=pipe is not None,
                                     elem_id=f"{prefix}-generate")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
        with gr.Column():
            gallery, preview, parameters = _results(prefix)
    gr.Examples([[str(EXAMPLES_DIR / e["image"]), e["prompt"], e["strength"]] for e in examples],
                inputs=[image, controls.prompt, strength], cache_examples=False)

    @gpu
    def image_to_image(image: Image.Image | None, strength: float, prompt: str, negative_prompt: str,
                       sampler: str, steps: int, guidance_scale: float, width: int, height: int, seed: int,
                       num_images: int, progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, Any, str]]:
        _require(pipe, notice)
        if image is not None and not width and not height:
            width, height = _native_area_size(image, pipe.native_size)

        def run(callback, cancel) -> Generation:
            return pipe.image_to_image(
                image, prompt, negative_prompt, strength=float(strength), width=int(width) or None,
                height=int(height) or None, steps=int(steps), guidance_scale=float(guidance_scale),
                sampler=sampler, seed=_seed(seed), num_images=int(num_images), callback=callback, cancel=cancel,
            )

        yield from _stream(pipe, run, progress)

    event = gr.on([generate.click, controls.prompt.submit], image_to_image,
                  inputs=[image, strength, *controls.inputs()], outputs=[gallery, preview, parameters],
                  api_name="image_to_image", concurrency_limit=GENERATION_CONCURRENCY, concurrency_id="model",
                  show_progress_on=[gallery])
    stop.click(None, cancels=[event], api_visibility="private", queue=False)


def _native_area_size(image: Image.Image, native_size: int) -> tuple[int, int]:
    """The input's aspect ratio at about the pixel count the model was trained at, in multiples of 8.

    A photo's own size is usually far larger: slow, and SD 1.x/2.x repeat themselves beyond it.
    """
    scale = native_size / math.sqrt(image.width * image.height)
    return max(8, round(image.width * scale / 8) * 8), max(8, round(image.height * scale / 8) * 8)


def _require(pipe: StableDiffusion | None, notice: str) -> None:
    if pipe is None:
        raise RequestError(f"No model is loaded, so this server cannot generate images. {notice}")


def _seed(seed: float | None) -> int | None:
    """-1 (or nothing) asks for a random seed; anything else goes to the pipeline's own checks."""
    return None if seed is None or seed == -1 else int(seed)


# ------------------------------------------------------------------------------------ streaming
def _stream(pipe: StableDiffusion, run: Callable[..., Generation],
            progress: gr.Progress) -> Iterator[tuple[Any, Any, str]]:
    """Run a generation in a worker thread; yield live previews, then the finished PNG files.

    The sampler's callback feeds a queue that this generator drains, so a slow browser never slows
    the sampling (previews it could not show in time are skipped). When Gradio closes the
    generator (the user pressed Stop or went away), ``finally`` sets the cancel event and the
    pipeline stops at its next step.
    """
    updates: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def on_step(step: int, total: int, x0_latents: torch.Tensor) -> None:
        updates.put(("step", step, total, _grid(pipe.preview(x0_latents))))

    def work() -> None:
        try:
            updates.put(("done", run(on_step, cancel)))
        except GenerationCancelled as error:  # the user pressed Stop or left: nobody is listening
            logger.info("Generation stopped: %s", error)
        except Exception as error:  # handed to the generator, which reports it on the page
            updates.put(("error", error))

    threading.Thread(target=work, name="generation", daemon=True).start()
    try:
        while True:
            update = updates.get()
            while not updates.empty():  # skip to the newest; "done"/"error" always come last
                update = updates.get_nowait()
            kind, *payload = update
            if kind == "error":
                raise _user_error(payload[0])
            if kind == "done":
                break
            step, total, preview = payload
            progress((step + 1, total), desc="Denoising", unit="steps")
            yield gr.skip(), preview, f"Step {step + 1} of {total}"
        result: Generation = payload[0]
        with tempfile.TemporaryDirectory(prefix="sd-app-") as folder:
            items = []
            for image, seed, parameters in zip(result.images, result.seeds, result.parameters, strict=True):
                path = Path(folder) / f"seed-{seed}.png"
                save_png(image, path, parameters)
                items.append((str(path), f"seed {seed}"))
            # Gradio copies the files into its cache while handling this yield, before the folder goes.
            yield items, gr.skip(), "\n\n".join(result.parameters)
    finally:
        cancel.set()


def _user_error(error: Exception) -> Exception:
    if isinstance(error, ValueError):
        return RequestError(str(error))
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return RequestError("Out of memory on the GPU: try a smaller size or fewer images.")
    logger.error("Generation failed", exc_info=error)
    return error


def _grid(images: list[Image.Image]) -> Image.Image:
    """The previews of a request side by side."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        grid.paste(image, (i * width, 0))
    return grid


# ------------------------------------------------------------------------------------ noise tab
def _noise_tab(pipe: StableDiffusion | None, examples: list[str]) -> None:
    gr.Markdown(
        "The forward process q(x_t | x_0) = N(√ᾱ_t·x_0, (1−ᾱ_t)·I) (Ho et al. 2020, eq. 4) for a few β "
        "schedules. Dashed lines: the same schedule rescaled to zero terminal SNR (Lin et al. 2023)."
    )
    with gr.Row():
        names = gr.CheckboxGroup(list(SCHEDULE_BETAS), value=list(SCHEDULE_BETAS), label="Schedules to compare")
        zero_snr = gr.Checkbox(value=False, label="Zero terminal SNR", info="rescale so that ᾱ at t = T−1 is 0")
        num_train_timesteps = gr.Slider(10, 4000, value=1000, step=10, precision=0, label="Training steps T")
    plot = gr.Plot(_schedule_figure(list(SCHEDULE_BETAS), zero_snr=False, num_train_timesteps=1000),
                   label="Schedules", elem_id="noise-plot")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image to noise", type="pil", sources=["upload", "clipboard"], height=256,
                             value=str(EXAMPLES_DIR / examples[0]))
            gr.Examples([[str(EXAMPLES_DIR / path)] for path in examples], inputs=[image], cache_examples=False)
        with gr.Column():
            strip_schedule = gr.Dropdown(list(SCHEDULE_BETAS), value="scaled_linear", label="Schedule for the images")
            timesteps = gr.Textbox(value=DEFAULT_TIMESTEPS, label="Timesteps t (comma separated, 0 to T−1)")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**32 - 1, label="Noise seed")
            noise = gr.Button("Noise the image", variant="primary", elem_id="noise-run")
    pixels = gr.Gallery(label="Noised in pixel space: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε", columns=6, height=240,
                        object_fit="contain", format="png", elem_id="noise-pixels")
    latents = gr.Gallery(label="What latent diffusion sees: VAE-encoded, noised in latent space, decoded",
                         columns=6, height=240, object_fit="contain", format="png",
                         elem_id="noise-latents")
    if pipe is None:
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
        if pipe is None:
            raise RequestError("The latent-space strip needs a model, and none is loaded.")
        x0 = _image_tensor(image)
        ts, alphas_bar = _checked_timesteps(timesteps, schedule, zero_snr, int(num_train_timesteps))
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
    if image is None:
        raise RequestError("No image: upload one or pick an example.")
    image = to_rgb(image)
    scale = NOISE_IMAGE_SIDE / max(image.size)
    size = tuple(max(8, round(side * scale / 8) * 8) for side in image.size)
    array = np.asarray(image.resize(size, Image.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _to_image(x: torch.Tensor) -> Image.Image:
    # x_t leaves [-1, 1] as noise is added; clipping is only for display.
    array = ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


if __name__ == "__main__":
    main()
