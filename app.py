"""Gradio demo of the from-scratch Stable Diffusion: text to image, image to image, inpainting (each can show
the inside of its run), noise schedules and sampler paths, PNG info.

Runs as a Hugging Face Space (python app.py, which is what a Space runs) or locally:

  python app.py                                   # SD 1.5 on a GPU; SD-Turbo + tiny decoder on a CPU
  python app.py --model ./my-model --dtype float32 --port 7861
  python app.py --lora-dir ~/loras                # the LoRA list; <lora:NAME:0.8> in prompts
  python app.py --share --auth alice:secret       # public link: set a password

The model picker at the top of the page switches to SD 1.5, SD-Turbo, an LCM model, the bundled
tiny model, or any Hub repo id, local folder or single file; one model is in memory at a time.

The page's parts are in webui/; they only call the stable_diffusion package. Nothing keeps state
between requests, so concurrent users each get exactly their own settings' result; generation
requests queue one at a time on the single model. On a CPU the app makes one image of its own as
soon as the page answers (a warm-up: the first image on a machine times its convolutions), so that
the first visitor's image is as fast as the next.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from stable_diffusion.devices import default_dtype, parse_device, parse_dtype
from stable_diffusion.hub import DEFAULT_TINY_VAE, ModelLoadError
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.samplers import SAMPLERS
from webui.generation import generation_tab
from webui.inpaint import inpaint_tab
from webui.inputs import refuse_decompression_bombs
from webui.models import (KnownModel, ModelLoader, ModelPicker, catalogue, default_source, known_models, recommended,
                          warm_up)
from webui.noise import noise_tab
from webui.png_info import png_info_tab
from webui.sdapi import api_routes, parse_logins
from webui.served import ServedModel, is_tiny_shapes

logger = logging.getLogger("app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
TINY_MODEL = HERE / "models" / "tiny-shapes"
LORA_DIR = HERE / "loras"
TITLE = "Stable Diffusion from scratch"
MAX_QUEUE = 32
# Page fixes, checked at 1400 px by tests/test_browser.py. Gradio floats a plot's or a gallery's
# label over its top-left corner, where it hides the plot's title and the first thumbnails: class
# "label-above" puts it above them. A slider's number box is wide enough for 8 digits, which
# leaves its label too little room on a half-width row: 4 digits and the spin buttons are enough.
# A gallery without a height is at least 450 px tall: class "gallery-fits" makes it as tall as its rows.
CSS = """
.label-above > label[data-testid="block-label"] { position: static; margin-bottom: var(--spacing-md); }
.gallery-fits .grid-wrap.fixed-height { min-height: 0; max-height: none; }
.bottom-aligned { align-items: flex-end; }
input[data-testid="number-input"] { width: 6em; }
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="Hub repo id, local diffusers folder or single .safetensors file (default: $SD_MODEL, "
                             "else SD-Turbo on a CPU, whose first image takes seconds, and SD 1.5 on a GPU; "
                             "offline and not cached: the bundled tiny model)")
    parser.add_argument("--tiny-vae", metavar="SOURCE",
                        help="the tiny decoder TAESD (Hub repo id, folder or file) to load with every model, for "
                             "fast decoding and previews; 'none': never (default: "
                             f"{DEFAULT_TINY_VAE} with the few-step models of the picker on a CPU)")
    parser.add_argument("--lora-dir", metavar="FOLDER", action="append", type=Path,
                        help="a folder of LoRA files for the LoRA list and <lora:NAME:WEIGHT> prompt tags; may be "
                             "given several times (default: loras/ beside app.py, when it exists)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: the best present)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float16 on a GPU, "
                                        "the fastest that keeps the image on a CPU)")
    parser.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (recommended with --share)")
    parser.add_argument("--api-auth", metavar="USER:PASSWORD[,...]",
                        help="require this login (HTTP basic auth) on the web UI's REST API /sdapi/v1 "
                             "(--auth logins work there too)")
    parser.add_argument("--no-api", action="store_true", help="do not serve the web UI's REST API /sdapi/v1")
    return parser


def load_model(source: str, loader: ModelLoader) -> ServedModel:
    """The model to serve, with a note for the page when it is not the one asked for.

    Without the Hub (offline, nothing cached) the app falls back to the bundled tiny model, and
    without that it still starts: the noise tab needs no model.
    """
    try:
        return ServedModel(loader(source), source=source, loader=loader)
    except ModelLoadError as error:
        logger.warning("Could not load %s: %s", source, error)
        reason = f"Could not load `{source}`: {error}"
    if not TINY_MODEL.is_dir():
        logger.warning("No bundled model at %s either: only the noise schedule tab can run.", TINY_MODEL)
        return ServedModel(None, f"{reason}\n\nNo bundled model was found at `models/tiny-shapes` either, so the "
                                 "generation tabs cannot run. The noise schedule tab works without a model.",
                           loader=loader)
    logger.warning("Running the bundled tiny model models/tiny-shapes instead (it draws one coloured shape).")
    return ServedModel(
        loader(str(TINY_MODEL)),
        f"{reason}\n\nRunning the bundled tiny model `models/tiny-shapes` instead: it draws one coloured shape "
        "on a coloured background, e.g. *a red circle on a blue background*.",
        source=str(TINY_MODEL),
        loader=loader,
    )


def build_demo(served: ServedModel, *, known: Sequence[KnownModel] = ()) -> gr.Blocks:
    """The whole page, serving ``served``; the picker offers ``known`` and the model served."""
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())

    def prompts_for(pipe: StableDiffusion | None) -> dict:
        return examples["tiny_shapes" if is_tiny_shapes(pipe) else "stable_diffusion"]

    prompts = prompts_for(served.pipe)
    refuse_decompression_bombs()
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        picker = ModelPicker(served, known, header=_header)
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text-to-image"):
                text_to_image = generation_tab(served, prefix="t2i", takes_image=False,
                                               placeholder=prompts["placeholder"], examples=prompts["text_to_image"])
            with gr.Tab("Image to image", id="image-to-image"):
                image_to_image = generation_tab(served, prefix="i2i", takes_image=True,
                                                placeholder=prompts["placeholder"],
                                                examples=[[str(EXAMPLES_DIR / e["image"]), e["prompt"], e["strength"]]
                                                          for e in prompts["image_to_image"]])
            with gr.Tab("Inpaint", id="inpaint"):
                inpaint = inpaint_tab(served, examples=prompts["inpaint"], examples_dir=EXAMPLES_DIR,
                                      placeholder=prompts["placeholder"])
            with gr.Tab("Noise schedule", id="noise-schedule"):
                sampler_paths = noise_tab(served, examples["noise_schedule"], EXAMPLES_DIR)
            with gr.Tab("PNG info", id="png-info"):
                png_info_tab(text_to_image, tabs=tabs, target_tab="text-to-image",
                             examples=[str(EXAMPLES_DIR / path) for path in examples["png_info"]])
        generation_controls = [text_to_image, image_to_image, inpaint]

        def page(pipe: StableDiffusion | None) -> dict:
            """The updates after a switch to ``pipe``: each tab's settings and prompt placeholder, the sampler paths."""
            placeholder = prompts_for(pipe)["placeholder"]
            return {**{component: update for controls in generation_controls
                       for component, update in controls.updates(pipe, placeholder=placeholder).items()},
                    **sampler_paths.updates(pipe)}

        picker.wire(demo, page, outputs=[*(c for controls in generation_controls for c in controls.updated()),
                                         sampler_paths.sampler, sampler_paths.steps, sampler_paths.plot])
    demo.queue(max_size=MAX_QUEUE)
    return demo


def _header(served: ServedModel) -> str:
    lines = [f"# {TITLE}"]
    pipe = served.pipe
    if pipe is not None:
        dtype = str(pipe.dtype).removeprefix("torch.")
        line = (f"Model **{pipe.name}** on **{pipe.device}** in **{dtype}** "
                f"(native size {pipe.native_size}×{pipe.native_size}")
        settings = recommended(pipe)
        if settings.kind:
            steps = "1 step" if settings.steps == 1 else f"{settings.steps} steps"
            line += (f"; a {settings.kind} model: {steps}, guidance {settings.guidance_scale:g}, "
                     f"{SAMPLERS[settings.sampler].label}")
        if pipe.tiny_vae is not None:
            line += "; tiny decoder TAESD loaded"
        lines.append(line + ").")
    if served.notice:
        lines.append(f"> ⚠️ {served.notice}".replace("\n\n", "\n>\n> "))
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("app", "webui", "stable_diffusion"):
        logging.getLogger(name).setLevel(logging.INFO)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must be USER:PASSWORD, both non-empty")
        auth = (user, password)
    try:
        api_logins = [] if args.api_auth is None else parse_logins(args.api_auth)
    except ValueError as error:
        parser.error(str(error))
    try:
        device = parse_device(args.device)
        dtype = parse_dtype(args.dtype) or default_dtype(device)
    except ValueError as error:  # one line, without the usage: the flag was understood, the machine lacks it
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    lora_dirs = args.lora_dir or ([LORA_DIR] if LORA_DIR.is_dir() else [])
    for folder in lora_dirs:
        if not folder.is_dir():
            parser.error(f"--lora-dir {folder}: there is no such folder")
    known = known_models(TINY_MODEL)
    tiny_vae = None if args.tiny_vae in (None, "none") else args.tiny_vae
    loader = ModelLoader(device, dtype, tiny_vae=tiny_vae, auto_tiny_vae=args.tiny_vae is None,
                         lora_dirs=tuple(lora_dirs), known=tuple(known))
    served = load_model(args.model or os.environ.get("SD_MODEL") or default_source(device), loader)
    if served.pipe is not None:
        logger.info("Serving %s on %s", served.pipe.name, served.pipe.device)
    demo = build_demo(served, known=known)
    # The web UI's REST API on the same FastAPI server (webui/sdapi.py), listing the picker's
    # models; --auth protects it too.
    routes = [] if args.no_api else api_routes(served, logins=api_logins + ([auth] if auth else []),
                                                checkpoints=catalogue(served.source, known))
    # ssr_mode=False: a Node front server (GRADIO_SSR_MODE) would not pass /sdapi/v1 on to this one.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                allowed_paths=[str(EXAMPLES_DIR)], theme=gr.themes.Soft(), css=CSS, app_kwargs={"routes": routes},
                ssr_mode=False, prevent_thread_lock=True)
    if served.pipe is not None and served.pipe.device.type == "cpu":
        # A first image on a CPU times each convolution shape (stable_diffusion.cpu_conv): pay that once
        # the page answers, before a visitor's image, rather than during it. A GPU has no such cost here.
        threading.Thread(target=warm_up, args=(served,), name="warm-up", daemon=True).start()
    demo.block_thread()


if __name__ == "__main__":
    main()
