"""The model the page serves, and what the page says about it."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from stable_diffusion.inside import StepChoice
from stable_diffusion.pipelines import CancelToken, Generation, StableDiffusion
from stable_diffusion.request import GenerationRequest
from stable_diffusion.samplers import StepCallback

from .errors import RequestError
from .jobs import GenerationQueue

__all__ = ["Loader", "ServedModel", "gpu", "is_tiny_shapes", "switch_model"]

logger = logging.getLogger(__name__)

# How the server loads a model: ``loader(source, device=None)``; device="meta" checks a model
# (files, configs, weight names and shapes) without taking its memory. See ``models.ModelLoader``.
Loader = Callable[..., StableDiffusion]

try:  # Hugging Face ZeroGPU: the decorated calls borrow a GPU; elsewhere a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


@dataclass
class ServedModel:
    """The pipeline every generation request runs on, or None (then ``notice`` says why).

    Handlers read ``pipe`` when a request arrives, never when the page is built. ``source`` is
    what it was loaded from (a Hub repo id, a folder or a file), to load it again. Every
    generation goes through ``generate``, which waits for its turn in ``queue``. ``loader`` loads
    the models ``switch_model`` switches to (default: ``hub.load`` on the served model's device and
    in its precision), and each of ``switched`` is called with the new model after a switch.
    """

    pipe: StableDiffusion | None
    notice: str = ""
    source: str | None = None
    queue: GenerationQueue = field(default_factory=GenerationQueue, repr=False, compare=False)
    loader: Loader | None = field(default=None, repr=False, compare=False)
    switched: list[Callable[[StableDiffusion], None]] = field(default_factory=list, repr=False, compare=False)

    def require(self) -> StableDiffusion:
        if self.pipe is None:
            raise RequestError(f"No model is loaded, so this server cannot generate images. {self.notice}")
        return self.pipe

    def generate(self, requests: Sequence[GenerationRequest], *, door: str, image: Image.Image | None = None,
                 mask: Image.Image | None = None, callback: StepCallback | None = None,
                 cancel: CancelToken | None = None, trajectory: StepChoice = 0, guidance_maps: StepChoice = 0,
                 attention_maps: bool = False, on_turn: Callable[[], None] | None = None) -> list[Generation]:
        """Run ``requests`` one after the other in one turn of the model's queue, on the model served then.

        ``door`` says who asked (for the log); ``image``, ``mask``, ``callback``, ``cancel`` and the
        observers of the inside (``trajectory``, ``guidance_maps``, ``attention_maps``: off by
        default, the plain path) as for ``StableDiffusion.generate``. An interrupt of the job
        (``queue.interrupt()``) stops it as ``cancel`` does. ``on_turn()`` is called when the turn
        begins; until then the request waits behind ``queue.running``.
        """
        name = "txt2img" if image is None else "img2img" if mask is None else "inpaint"
        with self.queue.turn(name, door=door, parts=len(requests), cancel=cancel) as job:
            job.pipe = self.require()
            if on_turn is not None:
                on_turn()
            results = []
            for part, request in enumerate(requests):
                job.part, job.step = part, 0
                results.append(job.pipe.generate(request, image=image, mask=mask, callback=job.observe(callback),
                                                 cancel=job.stop_when(cancel), trajectory=trajectory,
                                                 guidance_maps=guidance_maps, attention_maps=attention_maps))
            return results

    def load(self, source: str, *, device: torch.device | str | None = None) -> StableDiffusion:
        """The model at ``source``, loaded as this server loads models (on ``device`` when given)."""
        if self.loader is None:
            # The served model's own device cannot stand in: a switch has moved it to "meta" by then.
            raise RuntimeError("This server was started without a model loader (models.ModelLoader), so it cannot load models.")
        return self.loader(source, device=device)


def is_tiny_shapes(pipe: StableDiffusion | None) -> bool:
    """The bundled toy model, which only draws "a <colour> <shape> on a <colour> background"."""
    return pipe is not None and Path(pipe.name).name == "tiny-shapes"


def switch_model(served: ServedModel, source: str) -> None:
    """Serve the model at ``source`` instead, with one model in memory at a time and never a half-loaded one.

    1. The new model is loaded on the meta device first: its files, configs, weight names and
       shapes, tokenizer and tiny decoder are all checked, without taking memory, and a download
       happens here, while generations go on. Most failures end here, the old model untouched.
    2. In a turn of the queue (no generation runs, and the next one waits), the old model's weights
       are freed and the new model loads: the peak is about one model. Should this load still fail
       (out of memory, a file changed meanwhile), the old model is loaded again from its source.
       A model without a known source cannot be reloaded, so it stays in memory during the load.

    The error of a failed switch propagates; if even the old model could not be restored,
    ``served.notice`` says so and no model is served.
    """
    served.load(source, device="meta")
    with served.queue.turn("load model", door=source):
        old, old_source = served.pipe, served.source
        reloadable = old is not None and old_source is not None
        if reloadable:
            # Requests that arrive meanwhile still read the old model's name and limits from
            # served.pipe, and wait for their turn; none runs on it while its weights are gone.
            old.to("meta")
            gc.collect()
        try:
            pipe = served.load(source)
        except BaseException as error:
            if reloadable:
                _restore(served, old_source, failure=error)
            raise
        served.pipe, served.source, served.notice = pipe, source, ""
        for listener in served.switched:
            listener(pipe)


def _restore(served: ServedModel, source: str, *, failure: BaseException) -> None:
    logger.warning("Loading the new model failed (%s): loading %s again", failure, source)
    try:
        served.pipe = served.load(source)
    except Exception as error:
        logger.exception("Could not load %s again", source)
        served.pipe = None
        served.notice = (f"Switching models failed ({failure}), and loading the previous model `{source}` again "
                         f"failed too: {error}")
