"""One generation request: every setting a user can give, checked once, and written back as text.

Every door into the package (the Python API, the command line, the Gradio page and its HTTP
API) translates its inputs into a :class:`GenerationRequest`, so each check and each error
message exists once. The request checks what it can know alone (types, ranges, sizes in
multiples of 8); the pipeline adds what depends on the loaded model (the pixel budget, the
number of text-encoder layers, the sampler and steps, which ``samplers.plan_sampling`` checks).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any

from .samplers import SAMPLERS

__all__ = [
    "DECODERS",
    "MAX_GUIDANCE_SCALE",
    "MAX_MASK_BLUR",
    "MAX_SEED",
    "GenerationRequest",
    "InvalidSetting",
    "parse_parameters_text",
    "settings_from_parameters",
]

MAX_SEED = 2**63 - 1
MAX_GUIDANCE_SCALE = 30.0
MAX_MASK_BLUR = 64  # pixels, as far as the popular web UIs' slider goes
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
    image-to-image's and inpainting's (None for text-to-image). ``guidance_scale`` ≤ 1 means no
    guidance: one conditional pass per step, as diffusers does. ``mask_blur`` (σ in pixels of a
    Gaussian blur of the mask) and ``paste_back`` (the original's pixels outside the blurred mask)
    are inpainting's; the pipeline sets an unset strength and mask blur of an inpainting request.
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
    mask_blur: int | None = None
    paste_back: bool = False

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
        if self.mask_blur is not None and not (_is_whole(self.mask_blur) and 0 <= self.mask_blur <= MAX_MASK_BLUR):
            raise InvalidSetting(
                "mask_blur", f"must be a whole number of pixels from 0 to {MAX_MASK_BLUR}, got {self.mask_blur!r}."
            )
        if not isinstance(self.paste_back, bool):
            raise InvalidSetting("paste_back", f"must be True or False, got {self.paste_back!r}.")
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
        if self.mask_blur is not None:
            fields.append(f"Mask blur: {self.mask_blur}")
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


# One "Key: value" field of the settings line; a value in quotes may hold commas (A1111's format).
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def parse_parameters_text(text: str) -> dict[str, str]:
    """The fields of a PNG ``parameters`` text, ours or the web UIs': ``Prompt``, ``Negative prompt``,
    and each ``Key: value`` of the last line (``Steps``, ``Sampler``, ``Size``, ...), as strings.

    The format: the prompt (any number of lines), then optionally the negative prompt after
    "Negative prompt:", then one line of comma-separated fields. Text without such a last line is
    all prompt.
    """
    lines = text.strip("\n").split("\n") if text.strip() else []
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = value[1:-1].replace('\\"', '"') if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def settings_from_parameters(fields: dict[str, str]) -> dict[str, Any]:
    """The request settings that parsed parameters give (see ``parse_parameters_text``).

    Only what this package can reproduce: prompt, negative prompt, steps, sampler, guidance, seed,
    size, CLIP skip, strength and mask blur; unknown samplers and malformed numbers are left out.
    """
    settings: dict[str, Any] = {"prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt", "")}
    numbers_ = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float),
                "Mask blur": ("mask_blur", int)}
    for key, (setting, kind) in numbers_.items():
        try:
            settings[setting] = kind(fields[key])
        except (KeyError, ValueError):
            pass
    width, _, height = fields.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        settings["width"], settings["height"] = int(width), int(height)
    label = fields.get("Sampler", "")
    if fields.get("Schedule type", "").lower() == "karras" and not label.endswith("Karras"):
        label += " Karras"  # newer web UIs write the schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras"
    names = {spec.label.lower(): name for name, spec in SAMPLERS.items()}
    if label.lower() in names:
        settings["sampler"] = names[label.lower()]
    return settings
