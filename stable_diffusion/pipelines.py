"""Text-to-image and image-to-image: the networks, the schedule and a sampler put together.

Each generation follows the same numbered steps (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", sec. 3.3):

1. validate the request (sizes, steps, guidance, prompts) before any work is done;
2. encode the prompt and the negative prompt with the CLIP text encoder;
3. plan the sampling: timesteps and σ's for the chosen sampler (a shorter tail for img2img);
4. draw the initial latents (pure noise, or the encoded image noised to the first σ);
5. walk the reverse process with classifier-free guidance;
6. decode the latents with the VAE into images.

The latent scaling factor (0.18215 for SD 1.x/2.x) is applied here, nowhere else.

Randomness: image ``i`` of a request uses its own CPU ``torch.Generator`` seeded with
``seed + i``, drawn from in the order diffusers draws (img2img: the VAE posterior sample, then the
noise; then each ancestral step's noise), so a seed gives the same picture on any device and the
same picture as diffusers' pipelines given the same weights.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from . import denoisers, samplers, schedules
from .clip import CLIPTextModel
from .images import to_rgb
from .schedules import SchedulerConfig
from .taesd import TinyAutoencoder
from .unet import UNet
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], None]

MAX_SEED = 2**63 - 1
# Prompts longer than one CLIP window are split into windows of 75 tokens (+ BOS/EOS); this many
# windows at most (600 tokens): beyond it a prompt is almost surely a paste accident.
MAX_PROMPT_WINDOWS = 8
MAX_GUIDANCE_SCALE = 30.0
# VAEs smaller than this decode live previews exactly; larger ones use a linear approximation.
CHEAP_DECODE_PARAMETERS = 10_000_000

SAMPLER_LABELS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "euler_karras": "Euler Karras",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
"""Our sampler names as the popular web UIs label them in the PNG ``parameters`` text."""


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


@dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model: the three networks, the tokenizer and the schedule.

    Holds no per-request state, so one instance serves concurrent requests.
    """

    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    tokenizer: object  # transformers.CLIPTokenizer
    scheduler: SchedulerConfig
    name: str = "unnamed"
    tiny_vae: TinyAutoencoder | None = None  # TAESD (taesd.py): a fast decoder for previews, if loaded
    max_pixels: int = 1024 * 1024
    max_images: int = 8
    _latent_rgb: torch.Tensor | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, 768 for SD 2.1)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for net in (self.text_encoder, self.unet, self.vae):
            net.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------------- public API
    def text_to_image(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m_karras",
        seed: int | None = None,
        num_images: int = 1,
        clip_skip: int = 1,
        guidance_rescale: float = 0.0,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Generation:
        """Generate ``num_images`` images for ``prompt``.

        ``width``/``height`` default to the model's native size and must be multiples of 8.
        ``clip_skip`` counts as the web UIs do: 1 uses the text encoder's last layer, 2 the one
        before it. ``callback(step, total, x0_latents)`` runs after every step (see
        :meth:`preview`); a set ``cancel`` token stops the run between steps.
        """
        width, height = self._checked_size(width, height)
        request = self._checked_request(
            prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
            seed=seed, num_images=num_images, clip_skip=clip_skip, guidance_rescale=guidance_rescale,
        )
        plan = samplers.plan_sampling(self.scheduler, sampler, steps)
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        latent_shape = (1, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = torch.cat([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)
        x = samplers.initial_latents(plan, noise)
        images = self.decode(self._denoise(plan, x, request, generators, callback, cancel))
        return request.result(images, width, height)

    def image_to_image(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        *,
        strength: float = 0.75,
        width: int | None = None,
        height: int | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m_karras",
        seed: int | None = None,
        num_images: int = 1,
        clip_skip: int = 1,
        guidance_rescale: float = 0.0,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Generation:
        """Redraw ``image`` following ``prompt`` (SDEdit, Meng et al. 2022).

        The image is converted to RGB (transparent areas on white), resized to ``width`` x
        ``height`` (by default its own size, scaled down to the pixel budget and rounded down to
        multiples of 8), encoded, noised to the step that ``strength`` gives (as diffusers counts
        it: the last ``int(steps * strength)`` steps are run) and denoised from there.
        """
        pixels = self._prepare_image(image, width, height)
        height, width = pixels.shape[-2:]
        request = self._checked_request(
            prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
            seed=seed, num_images=num_images, clip_skip=clip_skip, guidance_rescale=guidance_rescale,
            strength=strength,
        )
        plan = samplers.plan_sampling(self.scheduler, sampler, steps, strength=strength)
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        # Per generator: first the posterior sample, then the noise (diffusers' order).
        x0 = torch.cat([self.encode(pixels, generator=g) for g in generators])
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]).to(self.device)
        x = samplers.noised_latents(plan, x0, noise)
        images = self.decode(self._denoise(plan, x, request, generators, callback, cancel))
        return request.result(images, width, height)

    def encode_prompt(self, prompt: str, *, clip_skip: int = 1, num_windows: int | None = None) -> torch.Tensor:
        """CLIP hidden states for ``prompt``: ``[1, 77 * windows, D]``.

        A prompt longer than one window (75 tokens between BOS and EOS) is split into 75-token
        windows, each encoded on its own and concatenated along the sequence, as the popular web
        UIs do; the UNet's cross-attention accepts any context length. ``num_windows`` pads with
        windows of the empty prompt, so a prompt and its negative can be stacked.
        """
        windows = self._token_windows(prompt)
        if num_windows is not None:
            windows += [self._pad_window([])] * (num_windows - len(windows))
        input_ids = torch.tensor(windows, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.text_encoder(input_ids, skip_last_layers=clip_skip - 1)
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

    def image_to_tensor(self, image: Image.Image, *, width: int | None = None, height: int | None = None) -> torch.Tensor:
        """An image of any mode as a ``[1, 3, H, W]`` tensor in [-1, 1], sized as img2img sizes it."""
        return self._prepare_image(image, width, height)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode model-space latents ``[B, 4, h, w]`` into PIL images, one at a time (memory)."""
        images = []
        for latent in latents.split(1):
            pixels = self._decode_pixels(latent / self.vae.config.scaling_factor)
            array = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy()[0]
            images.append(Image.fromarray((array * 255).round().astype(np.uint8)))
        return images

    def preview(self, x0_latents: torch.Tensor) -> list[Image.Image]:
        """A cheap RGB preview of predicted-x0 latents, for live progress in a UI.

        A small VAE (under ``CHEAP_DECODE_PARAMETERS``) simply decodes. For a large one (SD's has
        83 M parameters; a 512² decode costs more than a UNet step) a fixed linear map from the
        latent channels to RGB, fitted once per model by least squares on one small decode (SD's
        latents are close to linearly related to colour at 1/8 resolution), then upscaled: costs
        microseconds instead of a full decode.
        """
        if sum(p.numel() for p in self.vae.parameters()) < CHEAP_DECODE_PARAMETERS:
            return self.decode(x0_latents)
        if self._latent_rgb is None:
            self._latent_rgb = self._fit_latent_rgb()
        latents = x0_latents.float().cpu() / self.vae.config.scaling_factor
        weight, bias = self._latent_rgb[:, :-1], self._latent_rgb[:, -1]
        rgb = torch.einsum("bchw,rc->brhw", latents, weight) + bias[None, :, None, None]
        array = ((rgb / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        scale = self.vae_scale_factor
        return [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST) for a in array]

    # ---------------------------------------------------------------- steps
    def _denoise(self, plan, x, request, generators, callback, cancel) -> torch.Tensor:
        num_windows = max(len(self._token_windows(request.prompt)), len(self._token_windows(request.negative_prompt)))
        cond = self.encode_prompt(request.prompt, clip_skip=request.clip_skip, num_windows=num_windows)
        uncond = self.encode_prompt(request.negative_prompt, clip_skip=request.clip_skip, num_windows=num_windows)
        batch = x.shape[0]
        denoiser = denoisers.Denoiser(
            self._model_fn(), schedules.alphas_cumprod_from_config(self.scheduler), self.scheduler.prediction_type
        )
        guided = denoisers.guided(
            denoiser, cond=cond.float().expand(batch, -1, -1), uncond=uncond.float().expand(batch, -1, -1),
            scale=request.guidance_scale, rescale=request.guidance_rescale,
        )

        def on_step(step: int, total: int, x0_hat: torch.Tensor) -> None:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"generation cancelled after step {step + 1} of {total}")
            if callback is not None:
                callback(step, total, x0_hat)

        with torch.inference_mode():
            return samplers.run(plan, guided, x, generator=generators, callback=on_step)

    def _model_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        # The sampler's arithmetic stays in float32 whatever the network's precision: small
        # differences of large numbers (x - σ·ε at high σ) lose the image in bfloat16.
        unet, dtype = self.unet, self.dtype

        def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return unet(x.to(dtype), t, context.to(dtype)).float()

        return model

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            pixels = self.vae.decode(latent.to(self.vae_dtype))
            if not torch.isfinite(pixels).all() and self.vae_dtype == torch.float16:
                # The SD VAE decoder's activations overflow float16 on some images (a known
                # property of the released weights); redo this one decode in float32.
                logger.info("VAE decode overflowed float16; retrying in float32")
                pixels = self.vae.float().decode(latent.float())
                self.vae.to(torch.float16)
        if not torch.isfinite(pixels).all():
            raise ValueError(
                "The decoded image contains NaN or infinite values: the model diverged at this "
                "precision. Try float32 (--dtype float32), fewer guidance, or another sampler."
            )
        return pixels.float()

    def _fit_latent_rgb(self) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(0)
        side = max(4, 64 // self.vae_scale_factor)
        # A smooth random latent, so that the decoded colours vary slowly like real images.
        coarse = torch.randn((1, self.vae.config.latent_channels, 4, 4), generator=generator)
        latents = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        pixels = self._decode_pixels(latents.to(self.device)).cpu()
        pixels = torch.nn.functional.avg_pool2d(pixels, self.vae_scale_factor)
        design = torch.cat([latents.flatten(2)[0].T, torch.ones(side * side, 1)], dim=1)
        target = pixels.flatten(2)[0].T
        solution = torch.linalg.lstsq(design, target).solution  # [channels + 1, 3]
        return solution.T.contiguous()

    # ---------------------------------------------------------------- validation
    def _checked_request(self, prompt, negative_prompt, *, steps, guidance_scale, sampler, seed, num_images,
                         clip_skip, guidance_rescale, strength=None) -> "_Request":
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: describe the image you want, e.g. 'a red fox in the snow'.")
        if negative_prompt is None:
            negative_prompt = ""
        if not isinstance(negative_prompt, str):
            raise ValueError("The negative prompt must be text (or empty).")
        for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            windows = len(self._token_windows(text))
            if windows > MAX_PROMPT_WINDOWS:
                raise ValueError(
                    f"The {label} is too long: {windows * 75} tokens or more, the limit is "
                    f"{MAX_PROMPT_WINDOWS * 75}. Shorten it."
                )
        if sampler not in samplers.SAMPLER_NAMES:
            raise ValueError(f"Unknown sampler {sampler!r}: choose one of {', '.join(samplers.SAMPLER_NAMES)}.")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be a whole number, got {steps!r}.")
        if not (isinstance(guidance_scale, (int, float)) and 0.0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
            raise ValueError(f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE:g} (7.5 is typical), got {guidance_scale!r}.")
        if not (isinstance(guidance_rescale, (int, float)) and 0.0 <= guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be between 0 and 1, got {guidance_rescale!r}.")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= self.max_images:
            raise ValueError(f"num_images must be a whole number from 1 to {self.max_images}, got {num_images!r}.")
        max_skip = self.text_encoder.config.num_layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip < max_skip:
            raise ValueError(f"clip_skip must be a whole number from 1 (last layer) to {max_skip - 1}, got {clip_skip!r}.")
        if seed is None:
            seed = secrets.randbelow(2**32)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - num_images:
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED - num_images} (or None for a random one), got {seed!r}.")
        return _Request(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=float(guidance_scale),
            sampler=sampler, seeds=[seed + i for i in range(num_images)], clip_skip=clip_skip,
            guidance_rescale=float(guidance_rescale), strength=strength, model=self.name,
        )

    def _checked_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        for label, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < self.vae_scale_factor:
                raise ValueError(f"{label} must be a whole number of pixels of at least {self.vae_scale_factor}, got {value!r}.")
            if value % 8:
                raise ValueError(f"{label} must be a multiple of 8, got {value}: try {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}.")
        if width * height > self.max_pixels:
            raise ValueError(
                f"{width}x{height} is {width * height} pixels, over this server's budget of {self.max_pixels} "
                f"(e.g. {int(math.isqrt(self.max_pixels)) // 8 * 8} x {int(math.isqrt(self.max_pixels)) // 8 * 8}). Use a smaller size."
            )
        return width, height

    def _prepare_image(self, image: Image.Image, width: int | None, height: int | None) -> torch.Tensor:
        if image is None:
            raise ValueError("No input image: upload or paste an image to start from.")
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"The input image must be a PIL image or an array, got {type(image).__name__}.")
        if image.width < 1 or image.height < 1:
            raise ValueError("The input image is empty (0 pixels).")
        image = to_rgb(image)
        if width is None and height is None:
            # The image's own size, scaled down into the pixel budget, rounded down to 8.
            shrink = min(1.0, math.sqrt(self.max_pixels / (image.width * image.height)))
            width = max(8, int(image.width * shrink) // 8 * 8)
            height = max(8, int(image.height * shrink) // 8 * 8)
        else:
            width = width if width is not None else image.width * height // image.height // 8 * 8
            height = height if height is not None else image.height * width // image.width // 8 * 8
        width, height = self._checked_size(width, height)
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]

    # ---------------------------------------------------------------- tokens
    def _token_windows(self, text: str) -> list[list[int]]:
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        span = length - 2
        chunks = [ids[i : i + span] for i in range(0, len(ids), span)] or [[]]
        return [self._pad_window(chunk) for chunk in chunks]

    def _pad_window(self, chunk: list[int]) -> list[int]:
        length = self.text_encoder.config.max_position_embeddings
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        window = [tok.bos_token_id, *chunk, tok.eos_token_id]
        return window + [pad] * (length - len(window))


@dataclass(frozen=True)
class _Request:
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    sampler: str
    seeds: list[int]
    clip_skip: int
    guidance_rescale: float
    strength: float | None
    model: str

    def result(self, images: list[Image.Image], width: int, height: int) -> Generation:
        size = f"{width}x{height}"
        return Generation(images, self.seeds, [self.infotext(seed, size) for seed in self.seeds])

    def infotext(self, seed: int, size: str) -> str:
        """The generation parameters in the text format the popular web UIs write into PNGs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {SAMPLER_LABELS.get(self.sampler, self.sampler)}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {seed}",
            f"Size: {size}",
            f"Model: {self.model}",
        ]
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.clip_skip > 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        if self.guidance_rescale:
            fields.append(f"CFG rescale: {self.guidance_rescale:g}")
        lines.append(", ".join(fields))
        return "\n".join(lines)
