"""The web UI's REST API in our terms: its JSON fields, sampler names and images, translated.

AUTOMATIC1111's web UI speaks ``cfg_scale``, ``batch_size``, ``n_iter``, ``"DPM++ 2M"`` with
``scheduler="Karras"`` and base64 PNGs; the package speaks ``GenerationRequest``. This module
is only that translation, both ways. The checks are the request's and the pipeline's, plus the
page's server limits (steps, images); each problem is named by the API's own field
(``cfg_scale``, not ``guidance_scale``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import secrets
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from stable_diffusion.images import save_png
from stable_diffusion.pipelines import Generation
from stable_diffusion.request import GenerationRequest, InvalidSetting, parse_parameters_text, settings_from_parameters
from stable_diffusion.samplers import SAMPLERS

from .inputs import MAX_IMAGE_MEGAPIXELS

__all__ = [
    "SCHEDULERS",
    "ImageToImagePayload",
    "PngInfoPayload",
    "TextToImagePayload",
    "api_error",
    "decode_image",
    "encode_png",
    "generation_info",
    "generation_requests",
    "png_info",
    "sampler_key",
    "sampler_list",
]

# Far above the pipeline's own limit (8 CLIP windows of 75 tokens): refused before tokenizing, so a
# pasted megabyte costs nothing.
MAX_PROMPT_CHARS = 20_000


# ------------------------------------------------------------------------------------ payloads
class _Payload(BaseModel):
    """The fields both generation endpoints read. Others are ignored, as the web UI ignores the
    fields of extensions it lacks; null means "the default" (this server's, see ``GenerationRequest``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    seed: int | None = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    override_settings: dict[str, Any] | None = None
    send_images: bool | None = True


class TextToImagePayload(_Payload):
    # The web UI's txt2img reads denoising_strength only for its hires fix, which this server lacks.
    denoising_strength: float | None = None


class ImageToImagePayload(_Payload):
    init_images: list[str]
    denoising_strength: float | None = 0.75
    mask: str | None = None  # inpainting: white repaints (base64, like init_images)
    mask_blur: int | None = None
    inpainting_fill: int | None = None  # 1 ("original", the web UI's default) is what this server does
    inpainting_mask_invert: int | None = 0  # 1: black repaints
    include_init_images: bool | None = False


class PngInfoPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str


# ------------------------------------------------------------------------------------ samplers
# The web UI's schedules that apply to our samplers. "Automatic" is each sampler's own default;
# since web UI 1.9 that is Karras for DPM++ 2M (its option scheduler="karras") and uniform otherwise.
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
_KARRAS_BY_DEFAULT = {"DPM++ 2M"}
# The web UI's own aliases of the samplers we have (its sd_samplers tables).
_WEB_UI_ALIASES = {"k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler",
                   "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_ka": "DPM++ 2M Karras"}


def _web_ui_sampler(name: str) -> tuple[str, str]:
    """Our sampler as the newer web UIs name it: (sampler_name, schedule type)."""
    spec = SAMPLERS[name]
    return spec.label.removesuffix(" Karras"), "Karras" if spec.karras else "Uniform"


def _families() -> dict[str, dict[bool, str]]:
    """Each web-UI base name ("DPM++ 2M") -> {karras?: our sampler name}."""
    families: dict[str, dict[bool, str]] = {}
    for name, spec in SAMPLERS.items():
        families.setdefault(_web_ui_sampler(name)[0], {})[spec.karras] = name
    return families


_FAMILIES = _families()
_BY_LOWER = {base.lower(): base for base in _FAMILIES}
# Every accepted spelling (lower case) -> the web-UI name it means. Ours ("dpmpp_2m") name the
# schedule too, so that each means exactly our sampler of that name.
_ALIASES = {**{alias: label.lower() for alias, label in _WEB_UI_ALIASES.items()},
            **{name: " ".join(_web_ui_sampler(name)).lower() for name in SAMPLERS}}


def sampler_key(sampler_name: str | None, scheduler: str | None) -> str:
    """Our sampler for the web UI's ``sampler_name`` and ``scheduler``, in either form it sends.

    Older web UIs name the schedule in the sampler ("DPM++ 2M Karras"), newer ones apart
    (``sampler_name="DPM++ 2M"``, ``scheduler="Karras"``); a schedule in the name wins, as there.
    """
    name = (sampler_name or "").strip().lower() or _web_ui_sampler(GenerationRequest.sampler)[0].lower()
    if name not in _BY_LOWER:  # "Euler" is the web UI's name before it is our sampler "euler"
        name = _ALIASES.get(name, name)
    schedule = (scheduler or "automatic").strip().lower()
    for suffix in ("karras", "uniform"):
        if name.endswith(" " + suffix) and name.removesuffix(" " + suffix) in _BY_LOWER:
            name, schedule = name.removesuffix(" " + suffix), suffix
    if name not in _BY_LOWER:
        raise InvalidSetting("sampler_name", f"{sampler_name!r} is not available here: use one of {', '.join(_FAMILIES)}.")
    base = _BY_LOWER[name]
    if schedule not in SCHEDULERS:
        raise InvalidSetting("scheduler", f"{scheduler!r} is not available here: use one of {', '.join(SCHEDULERS.values())}.")
    karras = base in _KARRAS_BY_DEFAULT if schedule == "automatic" else schedule == "karras"
    if karras not in _FAMILIES[base]:
        raise InvalidSetting("scheduler", f"{SCHEDULERS[schedule]} does not apply to {base}: use Automatic or Uniform.")
    return _FAMILIES[base][karras]


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: the web UI's base names, with their aliases and default schedule."""
    listing = []
    for base in _FAMILIES:
        default = "karras" if base in _KARRAS_BY_DEFAULT else None
        names = sorted(alias for alias, label in _ALIASES.items() if label in (base.lower(), f"{base} uniform".lower()))
        listing.append({"name": base, "aliases": names, "options": {"scheduler": default} if default else {}})
    return listing


# ------------------------------------------------------------------------------------ requests
def generation_requests(payload: _Payload, *, strength: float | None, max_steps: int, max_images: int,
                        inpainting: bool = False) -> list[GenerationRequest]:
    """One request per iteration (``n_iter``) of ``batch_size`` images, the seeds continuing.

    ``seed`` -1 draws one here, so that the iterations continue from it. The server's limits on
    steps and images apply as on the page; the model's own (the pixel budget) in the pipeline.
    """
    batch, iterations = payload.batch_size or 1, payload.n_iter or 1
    if payload.steps is not None and not 1 <= payload.steps <= max_steps:
        raise InvalidSetting("steps", f"must be from 1 to {max_steps} on this server, got {payload.steps}.")
    if not 1 <= batch <= max_images:
        raise InvalidSetting("batch_size", f"must be from 1 to {max_images} on this server, got {batch}.")
    if iterations < 1 or batch * iterations > max_images:
        raise InvalidSetting("n_iter", f"times batch_size must be from 1 to {max_images} images on this server, "
                                       f"got {iterations} x {batch}.")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(payload, field) or "") > MAX_PROMPT_CHARS:
            raise InvalidSetting(field, f"is too long: {len(getattr(payload, field))} characters, the limit is "
                                        f"{MAX_PROMPT_CHARS}. Shorten it.")
    overrides = payload.override_settings or {}
    seed = secrets.randbelow(2**32) if payload.seed in (None, -1) else payload.seed
    settings: dict[str, Any] = {
        "negative_prompt": payload.negative_prompt or "", "width": payload.width or None,
        "height": payload.height or None, "num_images": batch, "strength": strength,
        "sampler": sampler_key(payload.sampler_name or payload.sampler_index, payload.scheduler),
        "clip_skip": overrides.get("CLIP_stop_at_last_layers") or 1,
    }
    if payload.steps is not None:
        settings["steps"] = payload.steps
    if payload.cfg_scale is not None:
        settings["guidance_scale"] = payload.cfg_scale
    if inpainting:
        # The web UI always pastes the picture back outside the (blurred) mask; so does this server.
        blur = getattr(payload, "mask_blur", None)
        settings.update(mask_blur=4 if blur is None else blur, paste_back=True)
    request = GenerationRequest(payload.prompt or "", seed=seed, **settings)
    return [dataclasses.replace(request, seed=seed + i * batch) for i in range(iterations)]


# The request's settings under the API's field names, for error messages.
_API_NAMES = {"guidance_scale": "cfg_scale", "num_images": "batch_size", "sampler": "sampler_name",
              "strength": "denoising_strength", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
              "mask_blur": "mask_blur",
              "size": "width x height"}


def api_error(error: InvalidSetting) -> str:
    """The message of a bad setting, under the API's name for it."""
    return f"{_API_NAMES.get(error.setting, error.setting)} {error.problem}"


# ------------------------------------------------------------------------------------ images
def decode_image(data: object, *, field: str) -> Image.Image:
    """A base64 image (raw, or a ``data:image/...;base64,`` URL) as a PIL image, or a clear error."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidSetting(field, "must be an image (PNG, JPEG, WebP...) encoded as base64 text.")
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise InvalidSetting(field, "is a URL: this server fetches nothing; send the image itself, base64-encoded.")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSetting(field, "is not valid base64: send the image file's bytes, base64-encoded.") from None
    too_large = f"has more than {MAX_IMAGE_MEGAPIXELS} megapixels, the most this server opens: shrink it first."
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_MEGAPIXELS * 1_000_000:
            raise InvalidSetting(field, f"is {image.width}x{image.height}: {too_large}")
        image.load()
    except InvalidSetting:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the page's limit, set process-wide
        raise InvalidSetting(field, too_large) from None
    except Exception as error:  # a corrupt file raises anything from OSError to SyntaxError: the client's fault
        raise InvalidSetting(field, f"is not an image this server can read ({type(error).__name__}: {error}).") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """``image`` as base64 PNG text, with its ``parameters`` chunk when given."""
    buffer = io.BytesIO()
    if parameters is None:
        image.save(buffer, format="PNG")
    else:
        save_png(image, buffer, parameters)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_info(image: Image.Image) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: the parameters text, the other text chunks, and the fields parsed.

    The parsed sampler is split as the newer web UIs write it (Sampler + Schedule type), so that
    sending the fields back as ``sampler_name`` and ``scheduler`` makes the same picture.
    """
    chunks = {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
    text = chunks.pop("parameters", "")
    parameters: dict[str, Any] = parse_parameters_text(text) if text else {}
    width, _, height = parameters.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        parameters["Size-1"], parameters["Size-2"] = int(width), int(height)
    sampler = settings_from_parameters(parameters).get("sampler")  # None: a sampler we lack, left as written
    if sampler is not None and "Schedule type" not in parameters:
        parameters["Sampler"], parameters["Schedule type"] = _web_ui_sampler(sampler)
    return {"info": text, "items": chunks, "parameters": parameters}


# ------------------------------------------------------------------------------------ answers
def generation_info(requests: list[GenerationRequest], results: list[Generation]) -> str:
    """The answer's ``info``: a JSON string with the web UI's keys that apply here."""
    first, images = requests[0], [image for result in results for image in result.images]
    model = parse_parameters_text(results[0].parameters[0]).get("Model")  # the model that made them
    seeds = [seed for result in results for seed in result.seeds]
    sampler, schedule = _web_ui_sampler(first.sampler)
    count = len(seeds)
    return json.dumps({
        "prompt": first.prompt, "all_prompts": [first.prompt] * count,
        "negative_prompt": first.negative_prompt, "all_negative_prompts": [first.negative_prompt] * count,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": images[0].width, "height": images[0].height, "sampler_name": sampler, "cfg_scale": first.guidance_scale,
        "steps": first.steps, "batch_size": first.num_images, "sd_model_name": model,
        "denoising_strength": first.strength, "extra_generation_params": {"Schedule type": schedule},
        "index_of_first_image": 0, "infotexts": [text for result in results for text in result.parameters],
        "styles": [], "clip_skip": first.clip_skip, "is_using_inpainting_conditioning": False,
    })
