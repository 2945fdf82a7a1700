"""One generation request: every setting a user can give, checked once, and written back as text.

Every door into the package (the Python API, the command line, the Gradio page and its HTTP
API) translates its inputs into a :class:`GenerationRequest`, so each check and each error
message exists once. The request checks what it can know alone (types, ranges, sizes in
multiples of 8); the pipeline adds what depends on the loaded model (the pixel budget, the
number of text-encoder layers, the sampler and steps, which ``samplers.plan_sampling`` checks).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["DECODERS", "MAX_GUIDANCE_SCALE", "MAX_SEED", "GenerationRequest", "InvalidSetting"]

MAX_SEED = 2**63 - 1
MAX_GUIDANCE_SCALE = 30.0
DECODERS = ("full", "tiny")
"""``full``: the model's VAE decoder; ``tiny``: the tiny autoencoder (TAESD), ~18x cheaper."""


class InvalidSetting(ValueError):
    """One setting of a request is wrong: ``setting`` is its field name, ``problem`` the rest.

    The message reads "<setting> <problem>" (e.g. "guidance_scale must be between 0 and 30 ...");
    a door shows it under its own name for the setting (the CLI's ``--cfg``, the page's label).
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``seed=None`` draws one; image ``i`` uses ``seed + i``.

    ``width``/``height``: multiples of 8; ``None`` is the model's native size for text-to-image
    and the input's aspect ratio at the native area for image-to-image. ``clip_skip`` counts as
    the web UIs do: 1 uses the text encoder's last layer, 2 the one before it. ``strength`` is
    image-to-image's (None for text-to-image). ``guidance_scale`` ≤ 1 means no guidance: one
    conditional pass per step, as diffusers does.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m_karras"
    seed: int | None = None
    num_images: int = 1
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    strength: float | None = None
    decoder: str = "full"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidSetting("prompt", f"must be text (it may be empty: an unconditional sample), got {type(self.prompt).__name__}.")
        if self.negative_prompt is None:
            object.__setattr__(self, "negative_prompt", "")
        if not isinstance(self.negative_prompt, str):
            raise InvalidSetting("negative_prompt", "must be text (or empty).")
        for label, value in (("width", self.width), ("height", self.height)):
            _check_side(label, value)
        if not _is_whole(self.steps):
            raise InvalidSetting("steps", f"must be a whole number, got {self.steps!r}.")
        if not (_is_number(self.guidance_scale) and 0.0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE):
            raise InvalidSetting(
                "guidance_scale",
                f"must be between 0 and {MAX_GUIDANCE_SCALE:g} (7.5 is typical; 1 or less: no guidance), "
                f"got {self.guidance_scale!r}.",
            )
        if not (_is_number(self.guidance_rescale) and 0.0 <= self.guidance_rescale <= 1.0):
            raise InvalidSetting("guidance_rescale", f"must be between 0 and 1, got {self.guidance_rescale!r}.")
        if not _is_whole(self.num_images) or self.num_images < 1:
            raise InvalidSetting("num_images", f"must be a whole number of at least 1, got {self.num_images!r}.")
        if not _is_whole(self.clip_skip) or self.clip_skip < 1:
            raise InvalidSetting("clip_skip", f"must be a whole number of at least 1 (1: the last layer), got {self.clip_skip!r}.")
        if self.seed is not None and not (_is_whole(self.seed) and 0 <= self.seed <= MAX_SEED - self.num_images):
            raise InvalidSetting(
                "seed", f"must be a whole number from 0 to {MAX_SEED - self.num_images} (or None for a random one), got {self.seed!r}."
            )
        if self.strength is not None and not _is_number(self.strength):
            raise InvalidSetting("strength", f"must be a number in (0, 1], got {self.strength!r}.")
        if self.decoder not in DECODERS:
            raise InvalidSetting("decoder", f"must be one of {', '.join(DECODERS)}, got {self.decoder!r}.")

    @property
    def seeds(self) -> list[int]:
        """The seed of each image; only for a request whose seed is set."""
        if self.seed is None:
            raise ValueError("This request draws a random seed: set one first (dataclasses.replace(request, seed=...)).")
        return [self.seed + i for i in range(self.num_images)]

    def parameters_text(self, seed: int, width: int, height: int, *, sampler_label: str, model: str) -> str:
        """The settings of one image in the text format the popular web UIs write into PNGs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {sampler_label}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {seed}",
            f"Size: {width}x{height}",
            f"Model: {model}",
        ]
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.clip_skip > 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        if self.guidance_rescale:
            fields.append(f"CFG rescale: {self.guidance_rescale:g}")
        if self.decoder != "full":
            fields.append("VAE: TAESD")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _check_side(label: str, value: int | None) -> None:
    if value is None:
        return
    if not _is_whole(value) or value < 8:
        raise InvalidSetting(label, f"must be a whole number of pixels of at least 8, got {value!r}.")
    if value % 8:
        raise InvalidSetting(label, f"must be a multiple of 8, got {value}: try {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}.")
