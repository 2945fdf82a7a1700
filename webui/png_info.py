"""The PNG info tab: the generation parameters an image carries, and a button that sends them to text to image.

Our PNGs and the popular web UIs' keep the settings in a ``parameters`` text chunk (see
``stable_diffusion.request.parameters_text``). The file is read as uploaded: Gradio's image
preprocessing would re-encode it (and drop the chunk) whenever it converts the colour mode.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from stable_diffusion.request import parse_parameters_text, settings_from_parameters

from .generation import Controls
from .inputs import CheckedImage

__all__ = ["png_info_tab", "read_png_info"]


def read_png_info(image: str | None) -> tuple[str, dict[str, Any], str]:
    """The parameters text of the image file at path ``image``, the settings it gives, and a note when it has none."""
    if image is None:
        return "", {}, ""
    with Image.open(image) as picture:
        picture.load()  # text chunks after the pixel data are read only with the pixels
        chunks = {key: value for key, value in picture.info.items() if isinstance(value, str)}
    text = chunks.get("parameters")
    if text is None:
        found = f" (its text chunks: {', '.join(sorted(chunks))})" if chunks else ""
        return "", {}, f"No generation parameters in this image: it has no `parameters` text chunk{found}."
    return text, _settings(text), ""


def png_info_tab(target: Controls, *, tabs: gr.Tabs, target_tab: str, examples: list[str]) -> None:
    """The tab: an image in, its parameters out, and "Send to text to image" filling ``target``.

    ``examples``: paths of images with parameters; ``target_tab``: the id of ``target``'s tab in ``tabs``.
    """
    gr.Markdown("Drop a PNG made here or by the popular web UIs (AUTOMATIC1111, Forge, SD.Next): the "
                "generation parameters it carries appear, and **Send to text to image** copies the prompt, "
                "negative prompt, sampler, steps, guidance, size and seed into that tab.")
    with gr.Row():
        with gr.Column():
            image = CheckedImage(label="Image with parameters", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], height=384, elem_id="png-input")
            gr.Examples([[path] for path in examples], inputs=[image], cache_examples=False, elem_id="png-examples")
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=6, buttons=["copy"], elem_id="png-parameters",
                              info="read from the image, or pasted here")
            note = gr.Markdown(elem_id="png-note")
            settings = gr.JSON(label="Settings for text to image", elem_id="png-settings")
            send = gr.Button("Send to text to image", variant="primary", elem_id="png-send")
    image.change(read_png_info, inputs=image, outputs=[text, settings, note], api_name="png_info")
    text.input(_settings, inputs=text, outputs=settings, api_name="parse_parameters")

    def send_to_text_to_image(text: str | None) -> dict[gr.components.Component | gr.Tabs, Any]:
        updates, notes = _updates(parse_parameters_text(text or ""), target)
        if notes:
            gr.Info(" ".join(notes), title="Not everything could be sent")
        return {**updates, tabs: gr.Tabs(selected=target_tab)}

    send.click(send_to_text_to_image, inputs=text,
               outputs=[target.prompt, target.negative_prompt, target.sampler, target.steps, target.guidance_scale,
                        target.width, target.height, target.seed, tabs],
               api_visibility="private")


def _settings(text: str | None) -> dict[str, Any]:
    return settings_from_parameters(parse_parameters_text(text or ""))


def _updates(fields: dict[str, str], target: Controls) -> tuple[dict[gr.components.Component, Any], list[str]]:
    """New values for ``target``'s components, within their bounds, and notes on what could not be sent as is."""
    settings = settings_from_parameters(fields)
    updates = {target.prompt: settings["prompt"], target.negative_prompt: settings["negative_prompt"]}
    notes = []
    if "sampler" in settings:
        updates[target.sampler] = settings["sampler"]
    elif fields.get("Sampler"):
        notes.append(f"Sampler {fields['Sampler']!r} is not one this app has: the sampler was left as it was.")
    sliders = {"steps": target.steps, "guidance_scale": target.guidance_scale, "width": target.width,
               "height": target.height}
    for name, slider in sliders.items():
        if name not in settings:
            continue
        value = min(max(settings[name], slider.minimum), slider.maximum)
        if name in ("width", "height"):  # the pipeline takes multiples of 8, which the bounds are
            value = round(value / 8) * 8
        if value != settings[name]:
            notes.append(f"{slider.label} {settings[name]:g} became {value:g} (this model takes {slider.minimum:g} "
                         f"to {slider.maximum:g}).")
        updates[slider] = value
    if "seed" in settings:
        updates[target.seed] = settings["seed"]
    left_out = [name.replace("_", " ") for name in ("clip_skip", "strength") if name in settings]
    if left_out:
        notes.append(f"Text to image has no {' or '.join(left_out)} setting: not sent.")
    return updates, notes
