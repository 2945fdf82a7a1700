"""The inside of a generation on the page (issue #16): what a run records, and the views beneath its results.

An accordion on each generation tab asks the run for its trajectory (the noisy x_t and the
predicted x̂0 at N steps), where guidance pushes (|ε̂_cond − ε̂_uncond| at N steps) and its word
maps (cross-attention per prompt token): ``StableDiffusion.generate``'s observers, passed through
the model's queue (``ServedModel.generate``). A run without them records nothing and takes the
plain path.

What a run recorded stays in the session (a ``gr.State``, which ``gradio_client`` does not see
among an endpoint's outputs, so ``/text_to_image`` returns what it always returned). When the
run finishes, the views of its first image appear beneath the results; clicking another image
of the results shows its own. API clients ask ``/<tab's endpoint>_inside`` for the views of
their session's last run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from stable_diffusion.inside_pictures import MIN_CELL_SIDE, attention_overlays, guidance_strip, trajectory_strip
from stable_diffusion.pipelines import Generation

from .errors import RequestError
from .inputs import CheckedCheckbox, CheckedNumber, CheckedSlider

__all__ = ["DEFAULT_STEPS_SHOWN", "MAX_STEPS_SHOWN", "InsideOptions", "InsideViews", "Recorded", "enlarged",
           "observers"]

# Columns of the strips: one per step shown, from the first step to the last.
MAX_STEPS_SHOWN = 12
DEFAULT_STEPS_SHOWN = 6
# A session's last recorded run is dropped after this long (and when its browser tab closes): the
# word maps of 4 SD images at 512² with a 20-token prompt take about 80 MB.
RECORD_TTL_S = 1800
# Small images (the bundled model's 32 px) are enlarged for the word maps, their pixels kept sharp.
OVERLAY_SIDE = 256


def enlarged(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled up by a whole factor, without smoothing, so that its longer side is about ``side``."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


class InsideOptions:
    """The accordion "Inside the generation": which views a run records, in the order its endpoint takes them."""

    def __init__(self, *, prefix: str) -> None:
        # One option a line: each one's explanation fits on it at half the page's width.
        with gr.Accordion("Inside the generation", open=False, elem_id=f"{prefix}-inside"):
            self.denoising = CheckedCheckbox(value=False, label="Show the denoising",
                                             info="the noisy x_t the network saw and its prediction x̂0, at N steps",
                                             elem_id=f"{prefix}-show-denoising")
            self.guidance = CheckedCheckbox(value=False, label="Where guidance pushes",
                                            info="|ε̂ with the prompt − ε̂ without| at N steps; needs guidance > 1",
                                            elem_id=f"{prefix}-show-guidance")
            self.word_maps = CheckedCheckbox(value=False, label="Word maps",
                                             info="where each word of the prompt acts (cross-attention)",
                                             elem_id=f"{prefix}-show-word-maps")
            self.steps_shown = CheckedSlider(1, MAX_STEPS_SHOWN, value=DEFAULT_STEPS_SHOWN, step=1, precision=0,
                                             label="Steps shown (N)", info="spread from the first step to the last",
                                             elem_id=f"{prefix}-steps-shown")

    def inputs(self) -> list[gr.components.Component]:
        return [self.denoising, self.guidance, self.word_maps, self.steps_shown]


def observers(show_denoising: bool, show_guidance: bool, show_word_maps: bool, steps_shown: float) -> dict[str, Any]:
    """The options of ``StableDiffusion.generate`` that record what the page's options ask for (0, False: nothing)."""
    steps = int(steps_shown)
    return {"trajectory": steps if show_denoising else 0, "guidance_maps": steps if show_guidance else 0,
            "attention_maps": bool(show_word_maps)}


@dataclass(frozen=True)
class Recorded:
    """A finished run that recorded some of its inside, and its guidance scale (which explains missing maps)."""

    result: Generation
    guidance_scale: float

    @classmethod
    def of(cls, result: Generation, guidance_scale: float) -> Recorded | None:
        """What to keep of ``result``: None when it recorded nothing."""
        recorded = result.trajectory or result.guidance_maps or result.attention_maps
        return cls(result, guidance_scale) if recorded else None


class InsideViews:
    """Beneath a tab's results: the views of one image of the last run, and the endpoint that returns them.

    ``recorded`` (a ``gr.State``) is the run's last output. The endpoint's outputs, as
    ``gradio_client`` returns them: a note (which image, and why a view asked for is missing), the
    denoising strip, the guidance strip and the word maps (a gallery of overlays captioned with
    their words), each None when not asked for.
    """

    def __init__(self, *, prefix: str) -> None:
        self.recorded = gr.State(None, time_to_live=RECORD_TTL_S)
        # The API's choice of image; the page chooses by clicking the results.
        self.image = CheckedNumber(value=1, precision=0, minimum=1, label="Image of the batch", visible=False)
        with gr.Column(visible=False, elem_id=f"{prefix}-inside-views") as self.section:
            self.note = gr.Markdown(elem_id=f"{prefix}-inside-note")
            with gr.Column(visible=False) as self.denoising_box:
                self.denoising = gr.Image(label="The denoising: the noisy x_t the network saw, and its prediction x̂0",
                                          format="png", interactive=False, buttons=["download", "fullscreen"],
                                          elem_id=f"{prefix}-inside-denoising", elem_classes=["label-above"])
            with gr.Column(visible=False) as self.guidance_box:
                self.guidance = gr.Image(label="Where guidance pushes: |ε̂ with the prompt − ε̂ without| over the "
                                               "image", format="png", interactive=False, buttons=["download", "fullscreen"],
                                         elem_id=f"{prefix}-inside-guidance", elem_classes=["label-above"])
            with gr.Column(visible=False) as self.words_box:
                # As tall as its rows of words ("gallery-fits", app.py's CSS), not Gradio's fixed 450 px.
                self.words = gr.Gallery(label="Word maps: where each word's cross-attention falls", columns=8,
                                        object_fit="contain", format="png", buttons=["download", "fullscreen"],
                                        elem_id=f"{prefix}-inside-words", elem_classes=["label-above", "gallery-fits"])

    def wire(self, triggers: list[Any], run: Any, results: gr.Gallery, *, api_name: str) -> None:
        """Hide the views when ``triggers`` start a run; show them when the ``run`` event succeeds, and another
        image's when one of the ``results`` is clicked. ``api_name``: the endpoint returning them."""
        outputs = [self.section, self.note, self.denoising_box, self.denoising, self.guidance_box, self.guidance,
                   self.words_box, self.words]

        def shown(recorded: Recorded | None, image: float = 1) -> dict[Any, Any]:
            return self._views(recorded, int(image))

        def selected(recorded: Recorded | None, event: gr.SelectData) -> dict[Any, Any]:
            return self._views(recorded, event.index + 1)

        gr.on(triggers, lambda: gr.Column(visible=False), outputs=self.section, queue=False, api_visibility="private")
        run.success(shown, inputs=[self.recorded, self.image], outputs=outputs, api_name=api_name,
                    show_progress="hidden")
        results.select(selected, inputs=self.recorded, outputs=outputs, api_visibility="private",
                       show_progress="hidden")

    def _views(self, recorded: Recorded | None, image: int) -> dict[Any, Any]:
        if recorded is None:
            return {self.section: gr.Column(visible=False),
                    self.note: "The last run asked for no view of its inside (show_denoising, show_guidance, "
                               "show_word_maps).",
                    self.denoising_box: gr.Column(visible=False), self.denoising: None,
                    self.guidance_box: gr.Column(visible=False), self.guidance: None,
                    self.words_box: gr.Column(visible=False), self.words: None}
        result = recorded.result
        count = len(result.images)
        if not 1 <= image <= count:
            raise RequestError(f"Image of the batch must be from 1 to {count} (the last run made {count}), "
                               f"got {image}.")
        i = image - 1
        denoising = trajectory_strip(result.trajectory[i]) if result.trajectory else None
        guidance = None
        if result.guidance_maps and result.guidance_maps[i]:
            # The heat maps are smoothed onto the enlarged pixels of a small image (bilinearly).
            guidance = guidance_strip(enlarged(result.images[i], MIN_CELL_SIDE), result.guidance_maps[i])
        words = None
        if result.attention_maps:
            words = attention_overlays(enlarged(result.images[i], OVERLAY_SIDE), result.attention_maps[i])
        return {self.section: gr.Column(visible=True), self.note: _note(recorded, i),
                self.denoising_box: gr.Column(visible=denoising is not None), self.denoising: denoising,
                self.guidance_box: gr.Column(visible=guidance is not None), self.guidance: guidance,
                self.words_box: gr.Column(visible=words is not None), self.words: words}


def _note(recorded: Recorded, i: int) -> str:
    """Which image the views are of, and why a view that was asked for is missing."""
    result = recorded.result
    lines = [f"**Inside image {i + 1} of {len(result.images)}** (seed {result.seeds[i]})"
             + (": click another image of the results to see its own." if len(result.images) > 1 else ".")]
    if result.guidance_maps and not result.guidance_maps[i]:
        if recorded.guidance_scale <= 1:
            lines.append(f"*Where guidance pushes*: nothing to map at guidance scale {recorded.guidance_scale:g}. "
                         "With guidance ≤ 1 the model only predicts the noise with the prompt, never without it, "
                         "so there is no difference to map: set the guidance scale above 1.")
        else:
            lines.append("*Where guidance pushes*: nothing to map: this model has guidance built into its network "
                         "(guidance-distilled), so it makes one prediction per step and there is no difference.")
    if result.attention_maps and not result.attention_maps[i]:
        lines.append("*Word maps*: the prompt has no words to map.")
    return "\n\n".join(lines)
