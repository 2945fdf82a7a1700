"""Text-to-image and image-to-image: the networks, the schedule and a sampler put together.

Every mode follows one generation path (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3), :meth:`StableDiffusion.generate`:

1. check the request against the model (sizes, limits, the sampling plan) before any work;
2. lay out the σ's the sampler visits (a shorter tail for image-to-image);
3. draw the initial latents: pure noise, or the encoded image noised to the first σ (the mode's job);
4. encode the prompt and the negative prompt with the CLIP text encoder;
5. walk the reverse process with classifier-free guidance;
6. decode the latents into images (the VAE, or the tiny autoencoder).

The latent scaling factor (0.18215 for SD 1.x/2.x) is applied here, nowhere else.

Randomness: image ``i`` of a request uses its own CPU ``torch.Generator`` seeded with
``seed + i``, drawn from in the order diffusers draws (img2img: the VAE posterior sample, then the
noise; then each ancestral step's noise), so a seed gives the same picture on any device and the
same picture as diffusers' pipelines given the same weights.

A pipeline holds no per-request state: one instance serves concurrent requests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from . import denoisers, prompts, samplers, schedules
from .clip import CLIPTextModel
from .layers import guidance_scale_embedding
from .images import checked_image, native_area_size, pil_to_tensor, tensor_to_pil
from .previews import CHEAP_DECODE_PARAMETERS, LatentRGB
from .request import GenerationRequest, InvalidSetting
from .samplers import SamplingPlan, StepCallback
from .schedules import SchedulerConfig
from .taesd import TinyAutoencoder
from .unet import UNet
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

# Prompts longer than one CLIP window are split into windows of 75 tokens (+ BOS/EOS); this many
# windows at most (600 tokens): beyond it a prompt is almost surely a paste accident.
MAX_PROMPT_WINDOWS = 8



class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class GenerationCancelled(RuntimeError):
    """Raised between sampling steps when the caller's cancel token is set."""


@dataclass(frozen=True)
class Generation:
    """The result of one request: image ``i`` was made with ``seeds[i]`` and ``parameters[i]``."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]


# ------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class _TextToImage:
    """Start from pure noise N(0, I), scaled to the plan's first σ."""

    width: int
    height: int

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> torch.Tensor:
        factor = pipe.vae.config.downsampling_factor
        shape = (len(generators), pipe.vae.config.latent_channels, self.height // factor, self.width // factor)
        return samplers.initial_latents(plan, samplers.draw_noise(shape, generator=generators, device=pipe.device))


@dataclass(frozen=True)
class _ImageToImage:
    """Start from the encoded image, noised to the plan's first σ (SDEdit, Meng et al. 2022)."""

    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1]

    @property
    def width(self) -> int:
        return self.pixels.shape[-1]

    @property
    def height(self) -> int:
        return self.pixels.shape[-2]

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> torch.Tensor:
        # Per generator: first the posterior sample, then the noise (diffusers' order).
        x0 = torch.cat([pipe.encode(self.pixels, generator=g) for g in generators])
        noise = samplers.draw_noise(x0.shape, generator=generators, device=pipe.device)
        return samplers.noised_latents(plan, x0, noise)


# ------------------------------------------------------------------------------------ pipeline
@dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model: the three networks, the tokenizer and the schedule.

    Holds no per-request state, so one instance serves concurrent requests. ``max_pixels`` and
    ``max_images`` bound a request (a server's protection; raise them for batch work).
    """

    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: SchedulerConfig
    name: str = "unnamed"
    tiny_vae: TinyAutoencoder | None = None  # TAESD (taesd.py): a fast decoder, for previews and decoder="tiny"
    max_pixels: int = 1024 * 1024
    max_images: int = 8
    # Fitted once here, read-only afterwards: safe to share between threads.
    _latent_rgb: LatentRGB | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if sum(p.numel() for p in self.vae.parameters()) >= CHEAP_DECODE_PARAMETERS:
            self._latent_rgb = LatentRGB.fit(
                self._decode_unscaled,
                latent_channels=self.vae.config.latent_channels,
                downsampling_factor=self.vae.config.downsampling_factor,
            )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, 768 for SD 2.1)."""
        return self.unet.config.sample_size * self.vae.config.downsampling_factor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for net in (self.text_encoder, self.unet, self.vae, self.tiny_vae):
            if net is not None:
                net.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------------- the modes
    def text_to_image(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
        **options: Any,
    ) -> Generation:
        """Generate images for ``prompt`` (an empty prompt samples p(x) unconditionally).

        ``options`` are the fields of :class:`GenerationRequest` (width, height, steps,
        guidance_scale, sampler, seed, num_images, clip_skip, guidance_rescale, decoder).
        ``callback(step, total, x0_latents)`` runs after every step (see :meth:`preview`); a set
        ``cancel`` token stops the run between steps.
        """
        request = GenerationRequest(prompt, negative_prompt, **options)
        return self.generate(request, callback=callback, cancel=cancel)

    def image_to_image(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
        **options: Any,
    ) -> Generation:
        """Redraw ``image`` following ``prompt`` (SDEdit, Meng et al. 2022).

        ``options`` as for :meth:`text_to_image`, plus ``strength`` (default 0.75): the image is
        noised to the step that ``strength`` gives (as diffusers counts it: the last
        ``int(steps * strength)`` steps are run) and denoised from there. Any image mode is
        accepted (transparency on white); without width and height it is resized to its aspect
        ratio at the model's native area.
        """
        request = GenerationRequest(prompt, negative_prompt, **{"strength": 0.75, **options})
        return self.generate(request, image=checked_image(image), callback=callback, cancel=cancel)

    def generate(
        self,
        request: GenerationRequest,
        *,
        image: Image.Image | None = None,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Generation:
        """The one generation path: text-to-image, or image-to-image when ``image`` is given."""
        image = None if image is None else checked_image(image)
        width, height = self._size(request, image)
        plan = self._check(request, width, height)
        mode = _TextToImage(width, height) if image is None else _ImageToImage(_pixels(image, width, height))
        if request.seed is None:
            request = dataclasses.replace(request, seed=secrets.randbelow(2**32))
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
        x = mode.initial_latents(self, plan, generators)
        latents = self._denoise(plan, x, request, generators, _step_hook(callback, cancel))
        images = self.decode(latents, decoder=request.decoder)
        label = samplers.SAMPLERS[request.sampler].label
        parameters = [
            request.parameters_text(seed, width, height, sampler_label=label, model=self.name)
            for seed in request.seeds
        ]
        return Generation(images, request.seeds, parameters)

    # ---------------------------------------------------------------- the networks
    def encode_prompt(self, prompt: str, *, clip_skip: int = 1, num_windows: int | None = None) -> torch.Tensor:
        """CLIP hidden states for ``prompt``, with its emphasis applied: ``[1, 77 * windows, D]``.

        The prompt is read as the popular web UIs read it (``prompts``): ``(word:1.3)`` weights,
        ``BREAK``, and windows of 75 tokens cut at a comma near the end. Each window is encoded
        on its own and the windows are concatenated along the sequence; the UNet's
        cross-attention accepts any context length. ``num_windows`` pads with windows of the
        empty prompt, so a prompt and its negative can be stacked.
        """
        windows = self._windows(prompt)
        if num_windows is not None:
            length = self.text_encoder.config.max_position_embeddings
            windows += [prompts.empty_window(self.tokenizer, length=length)] * (num_windows - len(windows))
        input_ids = torch.tensor([window.ids for window in windows], dtype=torch.long, device=self.device)
        weights = torch.tensor([window.weights for window in windows], device=self.device)
        with torch.inference_mode():
            hidden = self.text_encoder(input_ids, skip_last_layers=clip_skip - 1)
            hidden = prompts.apply_emphasis(hidden, weights)
        return hidden.reshape(1, -1, hidden.shape[-1])

    def encode(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Model-space latents (scaled by the latent factor, float32) of images in [-1, 1].

        ``sample=True`` draws from the VAE posterior with ``generator`` (what img2img does);
        ``sample=False`` returns its mean (what a visualisation wants).
        """
        with torch.inference_mode():
            posterior = self.vae.encode(pixels.to(self.device, self.vae_dtype))
            latents = posterior.sample(generator=generator) if sample else posterior.mean
        return latents.float() * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, *, decoder: str = "full") -> list[Image.Image]:
        """Decode model-space latents ``[B, 4, h, w]`` into PIL images, one at a time (memory).

        ``decoder="tiny"`` uses the tiny autoencoder (``tiny_vae``) instead of the VAE.
        """
        images = []
        for latent in latents.split(1):
            if decoder == "tiny":
                pixels = self._decode_tiny(latent)
            else:
                pixels = self._decode_unscaled(latent / self.vae.config.scaling_factor)
            images += tensor_to_pil(pixels)
        return images

    def preview(self, x0_latents: torch.Tensor) -> list[Image.Image]:
        """A cheap RGB preview of predicted-x̂0 latents, for live progress in a UI (see ``previews``)."""
        if self.tiny_vae is not None:
            return self.decode(x0_latents, decoder="tiny")
        if self._latent_rgb is None:
            return self.decode(x0_latents)
        return self._latent_rgb(x0_latents / self.vae.config.scaling_factor)

    # ---------------------------------------------------------------- the steps
    def _size(self, request: GenerationRequest, image: Image.Image | None) -> tuple[int, int]:
        """The request's size; by default the native size, or the input's aspect ratio at the native area."""
        width, height = request.width, request.height
        if image is None:
            return width or self.native_size, height or self.native_size
        if width is None and height is None:
            return native_area_size(image.size, self.native_size)
        if width is None:
            width = max(8, round(image.width * height / image.height / 8) * 8)
        elif height is None:
            height = max(8, round(image.height * width / image.width / 8) * 8)
        return width, height

    def _check(self, request: GenerationRequest, width: int, height: int) -> SamplingPlan:
        """Check ``request`` against this model's limits; return its sampling plan (which checks sampler and steps)."""
        if width * height > self.max_pixels:
            side = int(self.max_pixels**0.5) // 8 * 8
            raise InvalidSetting(
                "size",
                f"{width}x{height} is {width * height} pixels, over this server's budget of {self.max_pixels} "
                f"(e.g. {side}x{side}). Use a smaller size.",
            )
        if request.num_images > self.max_images:
            raise InvalidSetting("num_images", f"must be from 1 to {self.max_images}, got {request.num_images}.")
        max_skip = self.text_encoder.config.num_layers - 1
        if request.clip_skip > max_skip:
            raise InvalidSetting("clip_skip", f"must be from 1 (last layer) to {max_skip} for this text encoder, got {request.clip_skip}.")
        if request.decoder == "tiny" and self.tiny_vae is None:
            raise InvalidSetting(
                "decoder",
                "'tiny' needs the tiny autoencoder: load the model with tiny_vae='madebyollin/taesd' "
                "(or a local TAESD folder), or use the full decoder.",
            )
        for setting, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            windows = len(self._windows(text))
            if windows > MAX_PROMPT_WINDOWS:
                raise InvalidSetting(
                    setting, f"is too long: {windows * 75} tokens or more, the limit is {MAX_PROMPT_WINDOWS * 75}. Shorten it."
                )
        strength = 1.0 if request.strength is None else request.strength
        return samplers.plan_sampling(self.scheduler, request.sampler, request.steps, strength=strength)

    def _denoise(
        self,
        plan: SamplingPlan,
        x: torch.Tensor,
        request: GenerationRequest,
        generators: list[torch.Generator],
        on_step: StepCallback,
    ) -> torch.Tensor:
        alphas_cumprod = schedules.alphas_cumprod_from_config(self.scheduler)
        guidance_dim = self.unet.config.time_cond_proj_dim
        if guidance_dim is None:
            model, scale = self._model_fn(), request.guidance_scale
        else:
            # A guidance-distilled UNet (LCM, Luo et al. 2023, §4.2) takes the guidance weight as an
            # input beside the timestep and needs no guidance batch; diffusers' LCM pipeline feeds
            # w = guidance_scale - 1 and ignores the negative prompt.
            weight = torch.tensor([request.guidance_scale - 1.0])
            model, scale = self._model_fn(timestep_cond=guidance_scale_embedding(weight, guidance_dim)), 1.0
        # Scale <= 1 runs only the conditional pass (denoisers.guided): the negative prompt is not encoded.
        texts = (request.prompt, request.negative_prompt) if scale > 1 else (request.prompt,)
        num_windows = max(len(self._windows(text)) for text in texts)
        cond, *negative = (
            self.encode_prompt(text, clip_skip=request.clip_skip, num_windows=num_windows).float().expand(x.shape[0], -1, -1)
            for text in texts
        )
        uncond = negative[0] if negative else cond
        denoiser = denoisers.Denoiser(model, alphas_cumprod, self.scheduler.prediction_type)
        guided = denoisers.guided(denoiser, cond=cond, uncond=uncond, scale=scale, rescale=request.guidance_rescale)
        with torch.inference_mode():
            return samplers.run(plan, guided, x, generator=generators, callback=on_step)

    def _model_fn(self, *, timestep_cond: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
        # The sampler's arithmetic stays in float32 whatever the network's precision: small
        # differences of large numbers (x - σ·ε at high σ) lose the image in bfloat16.
        unet, dtype = self.unet, self.dtype
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(self.device, dtype)

        def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return unet(x.to(dtype), t, context.to(dtype), timestep_cond=timestep_cond).float()

        return model

    def _decode_unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (float32) of VAE latents (without the scaling factor)."""
        vae = self.vae
        with torch.inference_mode():
            pixels = vae.decode(latents.to(self.device, self.vae_dtype))
            if not torch.isfinite(pixels).all() and self.vae_dtype == torch.float16:
                # The SD VAE decoder's activations overflow float16 on some images (a known
                # property of the released weights): redo this decode in float32 on a private
                # copy, so that the shared VAE stays as it is for concurrent requests.
                logger.info("VAE decode overflowed float16; retrying in float32")
                pixels = copy.deepcopy(vae).float().decode(latents.to(self.device, torch.float32))
        return _finite(pixels.float())

    def _decode_tiny(self, latents: torch.Tensor) -> torch.Tensor:
        tiny_vae = self.tiny_vae
        dtype = next(tiny_vae.parameters()).dtype
        with torch.inference_mode():
            return _finite(tiny_vae.decode(latents.to(self.device, dtype)).float())

    def _windows(self, text: str) -> list[prompts.TokenWindow]:
        return prompts.token_windows(self.tokenizer, text, length=self.text_encoder.config.max_position_embeddings)


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image as the VAE's input ``[1, 3, height, width]`` in [-1, 1]."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return pil_to_tensor(image)[None]


def _step_hook(callback: StepCallback | None, cancel: CancelToken | None) -> StepCallback:
    """The sampler's per-step callback: stop when ``cancel`` is set, else report to ``callback``."""

    def on_step(step: int, total: int, x0_hat: torch.Tensor) -> None:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"generation cancelled after step {step + 1} of {total}")
        if callback is not None:
            callback(step, total, x0_hat)

    return on_step


def _finite(pixels: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(pixels).all():
        raise ValueError(
            "The decoded image contains NaN or infinite values: the model diverged at this "
            "precision. Try float32 (--dtype float32), fewer guidance, or another sampler."
        )
    return pixels
