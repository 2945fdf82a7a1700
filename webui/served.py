"""The model the page serves, and what the page says about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stable_diffusion.pipelines import StableDiffusion

from .errors import RequestError

__all__ = ["ServedModel", "gpu"]

try:  # Hugging Face ZeroGPU: the decorated calls borrow a GPU; elsewhere a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


@dataclass
class ServedModel:
    """The pipeline every generation request runs on, or None (then ``notice`` says why).

    Handlers read ``pipe`` when a request arrives, never when the page is built.
    """

    pipe: StableDiffusion | None
    notice: str = ""

    def require(self) -> StableDiffusion:
        if self.pipe is None:
            raise RequestError(f"No model is loaded, so this server cannot generate images. {self.notice}")
        return self.pipe

    @property
    def is_tiny_shapes(self) -> bool:
        """The bundled toy model, which only draws "a <colour> <shape> on a <colour> background"."""
        return self.pipe is not None and Path(self.pipe.name).name == "tiny-shapes"
