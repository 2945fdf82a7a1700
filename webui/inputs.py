"""Inputs that refuse bad values by name: Gradio's components with their preprocessing checked.

Gradio turns any exception other than ``gr.Error`` into "The upstream Gradio app has raised an
exception" and a traceback in the server log, and its components' own preprocessing (a slider
given text, an image that does not decode) raises exactly such exceptions before a handler
runs. These subclasses check the value first and say which field is wrong and what it takes.
The HTTP API meets them too: Gradio preprocesses every request's values, the page's or not.

(Gradio writes a ``.pyi`` stub beside any module that subclasses a component; it is ignored by
git. Keep this module to the components, so that the stub has nothing else to go stale.)
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any

import gradio as gr
from PIL import Image

from .errors import RequestError

__all__ = [
    "MAX_IMAGE_MEGAPIXELS",
    "CheckedCheckbox",
    "CheckedCheckboxGroup",
    "CheckedDropdown",
    "CheckedImage",
    "CheckedNumber",
    "CheckedSlider",
    "refuse_decompression_bombs",
]

# Uploads larger than this are refused before their pixels are decoded: 150 MB as 8-bit RGB,
# beyond any photo a generation needs (it is resized to the model's native area anyway).
MAX_IMAGE_MEGAPIXELS = 50


def refuse_decompression_bombs() -> None:
    """Make PIL refuse every image over MAX_IMAGE_MEGAPIXELS when it reads the header (process-wide).

    By itself PIL only warns between ``MAX_IMAGE_PIXELS`` and twice that, and decodes the image
    anyway; a server wants one limit, checked before the pixels take memory.
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_MEGAPIXELS * 1_000_000
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _shown(value: object) -> str:
    """A value as the message quotes it: short, whatever a client sent."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked_number(value: object, *, label: str, minimum: float | None, maximum: float | None) -> float:
    if minimum is not None and maximum is not None:
        allowed = f"a number from {minimum:g} to {maximum:g}"
    elif minimum is not None:
        allowed = f"a number of at least {minimum:g}"
    else:
        allowed = "a number"
    # bool is an int to Python, NaN passes every comparison, and ints can be too large for a float.
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or not (isinstance(value, numbers.Integral) or math.isfinite(value)) \
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise RequestError(f"{label} must be {allowed}, got {_shown(value)}.")
    return value


class CheckedSlider(gr.Slider):
    """A slider whose value must be a number within its bounds; anything else is refused by name."""

    is_template = True  # drawn by the frontend's slider

    def preprocess(self, payload: Any) -> float:
        return super().preprocess(_checked_number(payload, label=self.label, minimum=self.minimum, maximum=self.maximum))


class CheckedNumber(gr.Number):
    """A number field: empty (None) passes as None, anything else must be a number within bounds."""

    is_template = True

    def preprocess(self, payload: Any) -> float | None:
        if payload is None:
            return None
        return super().preprocess(_checked_number(payload, label=self.label, minimum=self.minimum, maximum=self.maximum))


class CheckedDropdown(gr.Dropdown):
    """A single-choice dropdown that names its choices when given anything else."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        values = [value for _, value in self.choices]
        if isinstance(payload, (list, dict)) or payload not in values:
            raise RequestError(f"{self.label} must be one of {', '.join(map(str, values))}; got {_shown(payload)}.")
        return super().preprocess(payload)


class CheckedCheckbox(gr.Checkbox):
    """A checkbox whose value must be true or false: Gradio's would pass on any text or number."""

    is_template = True

    def preprocess(self, payload: Any) -> bool:
        if not isinstance(payload, bool):
            raise RequestError(f"{self.label} must be true or false, got {_shown(payload)}.")
        return super().preprocess(payload)


class CheckedCheckboxGroup(gr.CheckboxGroup):
    """Checkboxes whose value must be a list of their choices."""

    is_template = True

    def preprocess(self, payload: Any) -> list[Any]:
        values = [value for _, value in self.choices]
        if not isinstance(payload, list) or any(isinstance(item, (list, dict)) or item not in values for item in payload):
            raise RequestError(f"{self.label} must be a list of some of {', '.join(map(str, values))}; "
                               f"got {_shown(payload)}.")
        return super().preprocess(payload)


class CheckedImage(gr.Image):
    """An image input that decodes the upload completely before the handler runs, so that a text
    file, an empty or truncated file, or an image over MAX_IMAGE_MEGAPIXELS gets a message
    instead of failing halfway through a generation. Files still come only from Gradio's cache:
    the checks run after Gradio's own.
    """

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        try:
            value = super().preprocess(payload)
            if isinstance(value, Image.Image):
                value.load()
            elif isinstance(value, str):  # type="filepath": the file as uploaded, checked all the same
                with Image.open(value) as image:
                    image.load()
        except gr.Error as error:  # Gradio's own refusals (an SVG file), without their traceback
            raise RequestError(f"{self.label}: {error.message}") from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as error:
            raise RequestError(f"{self.label}: {_image_problem(payload, error)}") from None
        return value


def _image_problem(payload: Any, error: Exception) -> str:
    name = getattr(payload, "orig_name", None) or "the file"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"{name} has more than {MAX_IMAGE_MEGAPIXELS} megapixels, the most this server opens: shrink it first."
    if isinstance(error, Image.UnidentifiedImageError):
        path = getattr(payload, "path", None)
        if path and os.path.isfile(path) and os.path.getsize(path) == 0:
            return f"{name} is empty (0 bytes)."
        return f"{name} is not an image file this server can read (PNG, JPEG, WebP, BMP, GIF, ...)."
    return f"{name} is damaged or cut short ({error}): save it again and upload the new file."
