"""The model the page serves, and what the page says about it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from stable_diffusion.hub import load
from stable_diffusion.pipelines import CancelToken, Generation, StableDiffusion
from stable_diffusion.request import GenerationRequest
from stable_diffusion.samplers import StepCallback

from .errors import RequestError
from .jobs import GenerationQueue

__all__ = ["ServedModel", "gpu", "switch_model"]

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
    generation goes through ``generate``, which waits for its turn in ``queue``.
    """

    pipe: StableDiffusion | None
    notice: str = ""
    source: str | None = None
    queue: GenerationQueue = field(default_factory=GenerationQueue, repr=False, compare=False)

    def require(self) -> StableDiffusion:
        if self.pipe is None:
            raise RequestError(f"No model is loaded, so this server cannot generate images. {self.notice}")
        return self.pipe

    @property
    def is_tiny_shapes(self) -> bool:
        """The bundled toy model, which only draws "a <colour> <shape> on a <colour> background"."""
        return self.pipe is not None and Path(self.pipe.name).name == "tiny-shapes"

    def generate(self, requests: Sequence[GenerationRequest], *, door: str, image: Image.Image | None = None,
                 mask: Image.Image | None = None, callback: StepCallback | None = None,
                 cancel: CancelToken | None = None) -> list[Generation]:
        """Run ``requests`` one after the other in one turn of the model's queue, on the model served then.

        ``door`` says who asked (for the log); ``image``, ``mask``, ``callback`` and ``cancel`` as for
        ``StableDiffusion.generate``. An interrupt of the job (``queue.interrupt()``) stops it as
        ``cancel`` does.
        """
        name = "txt2img" if image is None else "img2img" if mask is None else "inpaint"
        with self.queue.turn(name, door=door, parts=len(requests), cancel=cancel) as job:
            job.pipe = self.require()
            results = []
            for part, request in enumerate(requests):
                job.part, job.step = part, 0
                results.append(job.pipe.generate(request, image=image, mask=mask, callback=job.observe(callback),
                                                 cancel=job.stop_when(cancel)))
            return results


def switch_model(served: ServedModel, source: str) -> None:
    """Serve the model at ``source`` instead, on the same device and in the same precision.

    It loads between two generations (in a turn of the queue, so none runs on a half-swapped
    model) while the old one is still in memory; if loading fails, the error propagates and the
    old model stays served.
    """
    with served.queue.turn("load model", door=source):
        old = served.pipe
        pipe = load(source, device=None if old is None else old.device, dtype=None if old is None else old.dtype)
        served.pipe, served.source, served.notice = pipe, source, ""
