"""The inpainting tab: paint over a picture what to repaint, optionally extend the canvas, generate.

The image editor's background is the picture and its brush layers are the mask: every pixel
painted at least half opaque repaints (a layer uploaded without transparency, e.g. through the
API, counts by its white). Outpainting extends the canvas by whole multiples of 8 pixels on the
chosen sides (``inpainting.outpaint_canvas``) and repaints the new area as well. The result keeps
the picture's own pixels outside the blurred mask, as the popular web UIs do (``paste_back``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageChops

from stable_diffusion.images import checked_image
from stable_diffusion.inpainting import outpaint_canvas, read_mask
from stable_diffusion.request import MAX_MASK_BLUR

from .errors import user_error
from .generation import GENERATION_CONCURRENCY, Controls, result_components, stream_generation
from .inputs import CheckedSlider
from .inside_views import DEFAULT_STEPS_SHOWN, InsideOptions, InsideViews, observers
from .served import ServedModel, gpu

__all__ = ["MAX_OUTPAINT", "inpaint_tab"]

MAX_OUTPAINT = 256  # pixels per side
SIDES = ("left", "right", "top", "bottom")
# Brush strokes: half-transparent white, so the picture stays visible under the mask.
BRUSH = gr.Brush(colors=[("#ffffff", 0.7)], color_mode="fixed")
# The editor places an example's mask layer on a canvas of this size: the examples' pictures' size.
CANVAS = (512, 512)


def inpaint_tab(served: ServedModel, *, examples: list[dict[str, Any]], examples_dir: Path,
                placeholder: str) -> Controls:
    """The tab: the editor, inpainting's settings, the shared ones, the results and the ``inpaint`` endpoint.
    Returns the shared settings' controls (the model picker updates them).

    ``examples``: dicts with ``image`` and optionally ``mask`` (paths under ``examples_dir``),
    ``prompt``, ``strength`` and optionally ``outpaint_right`` (pixels).
    """
    if served.pipe is None:
        gr.Markdown(f"**This tab cannot run: no model is loaded.** {served.notice}")
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(label="Picture: paint over what to repaint", type="pil", image_mode="RGBA",
                                    sources=["upload", "clipboard"], brush=BRUSH, transforms=(), height=448,
                                    canvas_size=CANVAS, elem_id="inp-editor")
            with gr.Row():
                strength = CheckedSlider(0.05, 1.0, value=1.0, step=0.05, label="Strength",
                                     info="1: repaint the masked area from pure noise")
                mask_blur = CheckedSlider(0, MAX_MASK_BLUR, value=4, step=1, precision=0, label="Mask blur",
                                      info="pixels: fades the repainted area into the picture")
            with gr.Accordion("Outpaint: extend the canvas", open=False):
                with gr.Row():
                    outpaint = [CheckedSlider(0, MAX_OUTPAINT, value=0, step=8, precision=0, label=f"{side.title()} (px)",
                                          elem_id=f"inp-outpaint-{side}") for side in SIDES]
            controls = Controls(served, prefix="inp", auto_size=True, placeholder=placeholder)
            inside = InsideOptions(prefix="inp")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", interactive=served.pipe is not None,
                                     elem_id="inp-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="inp-stop")
        with gr.Column():
            outputs = result_components("inp")
    views = InsideViews(prefix="inp")
    rows = [[_editor_value(example, examples_dir), example["prompt"], example["strength"],
             example.get("outpaint_right", 0)] for example in examples]
    gr.Examples(rows, inputs=[editor, controls.prompt, strength, outpaint[1]], cache_examples=False)
    triggers = [generate.click, controls.prompt.submit]
    event = gr.on(triggers, _inpaint(served),
                  inputs=[editor, strength, mask_blur, *outpaint, *controls.inputs(), controls.decoder, *inside.inputs()],
                  outputs=[*outputs, views.recorded], api_name="inpaint", concurrency_limit=GENERATION_CONCURRENCY,
                  concurrency_id="model", show_progress_on=[outputs[0]])
    views.wire(triggers, event, outputs[0], api_name="inpaint_inside")
    stop.click(None, cancels=[event], api_visibility="private", queue=False)
    return controls


def _editor_value(example: dict[str, Any], examples_dir: Path) -> dict[str, Any]:
    layers = [str(examples_dir / example["mask"])] if "mask" in example else []
    return {"background": str(examples_dir / example["image"]), "layers": layers, "composite": None}


def _inpaint(served: ServedModel) -> Callable[..., Iterator[tuple[Any, ...]]]:
    @gpu
    def inpaint(editor: dict[str, Any] | None, strength: float, mask_blur: float, left: float, right: float,
                top: float, bottom: float, prompt: str, negative_prompt: str, sampler: str, steps: int,
                guidance_scale: float, width: int, height: int, seed: int, num_images: int, decoder: str = "full",
                show_denoising: bool = False, show_guidance: bool = False, show_word_maps: bool = False,
                steps_shown: int = DEFAULT_STEPS_SHOWN,
                progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        try:
            image, mask = _picture_and_mask(editor, left=int(left), right=int(right), top=int(top), bottom=int(bottom))
        except ValueError as error:
            raise user_error(error) from None
        settings = dict(negative_prompt=negative_prompt, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                        width=width or None, height=height or None, seed=seed, num_images=num_images,
                        strength=strength, mask_blur=int(mask_blur), paste_back=True, decoder=decoder)
        observe = observers(show_denoising, show_guidance, show_word_maps, steps_shown)
        yield from stream_generation(served, prompt, settings, image, progress, mask=mask, observe=observe)

    return inpaint


def _picture_and_mask(editor: dict[str, Any] | None, **outpaint: int) -> tuple[Image.Image, Image.Image]:
    """The editor's picture and mask, on the canvas extended by ``outpaint`` (pixels per side) if any."""
    if not editor or editor.get("background") is None:
        raise ValueError("No picture: upload one, then paint over what to repaint.")
    image = checked_image(editor["background"], what="picture")
    mask = Image.new("L", image.size, 0)
    for layer in editor.get("layers") or []:
        painted = read_mask(layer, size=image.size).point(lambda value: 255 if value >= 128 else 0)
        mask = ImageChops.lighter(mask, painted)
    if any(outpaint.values()):
        image, mask = outpaint_canvas(image, mask=mask, **outpaint)
    return image, mask
