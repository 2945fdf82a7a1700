"""Text-to-image, image-to-image and inpainting: the networks, the schedule and a sampler put together.

Every mode follows one generation path (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3.3), :meth:`StableDiffusion.generate`:

1. check the request against the model (sizes, limits, the sampling plan) before any work;
2. lay out the σ's the sampler visits (a shorter tail for image-to-image);
3. draw the initial latents: pure noise, or the encoded image noised to the first σ (the mode's job,
   which for inpainting also decides what the UNet sees besides them);
4. encode the prompt and the negative prompt with the CLIP text encoder;
5. walk the reverse process with classifier-free guidance;
6. decode the latents into images (the VAE, or the tiny autoencoder), and for inpainting paste the
   original back outside the mask if asked.

The latent scaling factor (0.18215 for SD 1.x/2.x) is applied here, nowhere else.

Randomness: image ``i`` of a request uses its own CPU ``torch.Generator`` seeded with
``seed + i``, drawn from in the order diffusers draws (img2img: the VAE posterior sample, then the
noise; inpainting: then the masked image's posterior sample too; then each ancestral step's noise),
so a seed gives the same picture on any device and the same picture as diffusers' pipelines given
the same weights.

A pipeline holds no per-request state: one instance serves concurrent requests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from . import denoisers, inpainting, inside, prompts, samplers, schedules
from .clip import CLIPTextModel
from .layers import guidance_scale_embedding
from .images import as_pil, checked_image, native_area_size, pil_to_tensor, tensor_to_pil
from .lora import LoraStack
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
    """The result of one request: image ``i`` was made with ``seeds[i]`` and ``parameters[i]``.

    What a run was asked to record of its inside (``inside``), per image, empty when not asked:
    ``trajectory[i]`` (x_t and x̂0 at the chosen steps), ``guidance_maps[i]`` (|ε̂_cond − ε̂_uncond|
    at the chosen steps; none without guidance), ``attention_maps[i]`` (one word map per prompt token).
    """

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]
    trajectory: list[list[inside.Snapshot]] = field(default_factory=list)
    guidance_maps: list[list[inside.GuidanceMap]] = field(default_factory=list)
    attention_maps: list[list[inside.WordMap]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class _Start:
    """Where a run starts: the initial latents x̃, and for inpainting what the UNet sees besides them."""

    latents: torch.Tensor
    # A 9-channel inpainting UNet's input after the noisy latents: the latent-size mask and the masked image's latents.
    unet_channels: torch.Tensor | None = None
    # A regular UNet's inpainting: the original latents, kept outside the mask.
    known: denoisers.KnownRegion | None = None

    def model(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The network as this run's UNet sees it: with ``unet_channels`` after the noisy latents."""
        channels = self.unet_channels
        if channels is None:
            return model

        def model_with_channels(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            # One set per image, repeated for the guidance batch ([uncond, cond] of the same images).
            return model(torch.cat([x, channels.repeat(x.shape[0] // channels.shape[0], 1, 1, 1)], dim=1), t, context)

        return model_with_channels

    def denoiser(self, denoiser: denoisers.GuidedDenoiser, plan: SamplingPlan) -> samplers.SamplerDenoiser:
        """The denoiser the sampler walks: for a regular UNet's inpainting, one that keeps the known region."""
        if self.known is None:
            return denoiser
        return denoisers.InpaintingDenoiser(denoiser, self.known, float(plan.sigmas[0]))

    def end(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampled latents; with a known region, the original outside the mask (the reference's last blend)."""
        return latents if self.known is None else self.known.restore(latents)


class _Mode:
    """A mode decides the initial latents, what the UNet sees besides them, and what happens after decoding."""

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> _Start:
        raise NotImplementedError

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        return images


@dataclass(frozen=True)
class _TextToImage(_Mode):
    """Start from pure noise N(0, I), scaled to the plan's first σ."""

    width: int
    height: int

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> _Start:
        shape = _latent_shape(pipe, len(generators), self.width, self.height)
        noise = samplers.draw_noise(shape, generator=generators, device=pipe.device)
        return _Start(samplers.initial_latents(plan, noise))


@dataclass(frozen=True)
class _ImageToImage(_Mode):
    """Start from the encoded image, noised to the plan's first σ (SDEdit, Meng et al. 2022)."""

    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1]

    @property
    def width(self) -> int:
        return self.pixels.shape[-1]

    @property
    def height(self) -> int:
        return self.pixels.shape[-2]

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> _Start:
        # Per generator: first the posterior sample, then the noise (diffusers' order).
        x0 = torch.cat([pipe.encode(self.pixels, generator=g) for g in generators])
        noise = samplers.draw_noise(x0.shape, generator=generators, device=pipe.device)
        return _Start(samplers.noised_latents(plan, x0, noise))


@dataclass(frozen=True)
class _Inpaint(_Mode):
    """Repaint where the mask is 1 and keep the rest, as diffusers' ``StableDiffusionInpaintPipeline``.

    An inpainting UNet (9 input channels: SD 1.5 and SD 2 inpainting, trained with the mask and
    the masked image's latents beside the noisy latents, Rombach et al. 2022, sec. 4.5) sees
    them at every step. A regular UNet repaints through ``denoisers.InpaintingDenoiser``, which
    keeps the original's latents outside the mask. ``paste``: (original, soft mask) to paste the
    original back outside the mask after decoding.
    """

    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    pixel_mask: torch.Tensor  # [1, 1, H, W], binary: 1 repaints
    latent_mask: torch.Tensor  # [1, 1, h, w], binary
    full_strength: bool  # strength 1: the masked area starts from pure noise
    paste: tuple[Image.Image, Image.Image] | None = None

    def initial_latents(self, pipe: StableDiffusion, plan: SamplingPlan, generators: list[torch.Generator]) -> _Start:
        # Per generator, diffusers' order: the image's posterior sample (which an inpainting UNet
        # starting from pure noise does without), the noise, the masked image's posterior sample.
        inpainting_unet = pipe.unet.config.in_channels != pipe.vae.config.latent_channels
        x0 = None
        if not (inpainting_unet and self.full_strength):
            x0 = torch.cat([pipe.encode(self.pixels, generator=g) for g in generators])
        shape = _latent_shape(pipe, len(generators), self.pixels.shape[-1], self.pixels.shape[-2])
        noise = samplers.draw_noise(shape, generator=generators, device=pipe.device)
        x = samplers.initial_latents(plan, noise) if self.full_strength else samplers.noised_latents(plan, x0, noise)
        mask = self.latent_mask.to(pipe.device).expand(len(generators), -1, -1, -1)
        if not inpainting_unet:
            # diffusers encodes the masked image for a regular UNet too, and does not use it: draw
            # what its posterior sample draws, so that ancestral samplers' noise follows the same.
            samplers.draw_noise(shape, generator=generators, dtype=pipe.vae_dtype)
            return _Start(x, known=denoisers.KnownRegion(x0, noise, mask))
        # The masked image: the pixels to repaint set to 0, mid-gray (diffusers: image * (mask < 0.5)).
        masked_pixels = self.pixels * (1 - self.pixel_mask)
        masked = torch.cat([pipe.encode(masked_pixels, generator=g) for g in generators])
        return _Start(x, unet_channels=torch.cat([mask, masked], dim=1))

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        return images if self.paste is None else inpainting.paste_back(images, *self.paste)


# ------------------------------------------------------------------------------------ pipeline
@dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model: the three networks, the tokenizer and the schedule.

    Holds no per-request state (its recent prompts' encodings are a cache keyed by all they depend
    on), so one instance serves concurrent requests. ``max_pixels`` and
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
    lora_dirs: Sequence[str | os.PathLike] = ()  # where <lora:NAME:WEIGHT> tags look for NAME
    # Fitted once here, read-only afterwards: safe to share between threads.
    _latent_rgb: LatentRGB | None = field(default=None, init=False, repr=False)
    _loras: LoraStack = field(init=False, repr=False)
    _prompt_states: _RecentPromptStates = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._loras = LoraStack(text_encoder=self.text_encoder, unet=self.unet)
        self._prompt_states = _RecentPromptStates()
        # A model loaded on the meta device (checked, without weights) has nothing to fit.
        if self.device.type != "meta" and sum(p.numel() for p in self.vae.parameters()) >= CHEAP_DECODE_PARAMETERS:
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
    def text_to_image(self, prompt: str, negative_prompt: str = "", **options: Any) -> Generation:
        """Generate images for ``prompt`` (an empty prompt samples p(x) unconditionally).

        ``options``: the fields of :class:`GenerationRequest` (width, height, steps,
        guidance_scale, sampler, seed, num_images, clip_skip, guidance_rescale, decoder), and
        those of :meth:`generate`: ``callback(step, total, x0_latents)`` runs after every step (see
        :meth:`preview`), a set ``cancel`` token stops the run between steps, and ``trajectory``,
        ``guidance_maps`` and ``attention_maps`` record the inside of the run.
        """
        request, run = _request_and_run_options(prompt, negative_prompt, options)
        return self.generate(request, **run)

    def image_to_image(self, image: Image.Image, prompt: str, negative_prompt: str = "", **options: Any) -> Generation:
        """Redraw ``image`` following ``prompt`` (SDEdit, Meng et al. 2022).

        ``options`` as for :meth:`text_to_image`, plus ``strength`` (default 0.75): the image is
        noised to the step that ``strength`` gives (as diffusers counts it: the last
        ``int(steps * strength)`` steps are run) and denoised from there. Any image mode is
        accepted (transparency on white); without width and height it is resized to its aspect
        ratio at the model's native area.
        """
        request, run = _request_and_run_options(prompt, negative_prompt, options, strength=0.75)
        return self.generate(request, image=checked_image(image), **run)

    def inpaint(
        self, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "", **options: Any
    ) -> Generation:
        """Repaint ``image`` where ``mask`` is white, following ``prompt``; keep the rest.

        ``options`` as for :meth:`image_to_image`, with ``strength`` (default 1: pure noise in the
        mask), ``mask_blur`` (default 0) and ``paste_back`` (default False), as ``inpainting``
        describes masks, blur and paste. An empty mask is an error; a full mask repaints everything.
        Without ``paste_back`` a seed gives diffusers' ``StableDiffusionInpaintPipeline``'s picture.
        """
        request, run = _request_and_run_options(prompt, negative_prompt, options, strength=1.0, mask_blur=0)
        return self.generate(request, image=checked_image(image), mask=as_pil(mask, what="mask"), **run)

    def generate(
        self,
        request: GenerationRequest,
        *,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
        trajectory: inside.StepChoice = 0,
        guidance_maps: inside.StepChoice = 0,
        attention_maps: bool = False,
    ) -> Generation:
        """The one generation path: text-to-image; image-to-image with ``image``; inpainting with a ``mask`` too.

        ``<lora:NAME:WEIGHT>`` tags in the prompt apply that LoRA (found in ``lora_dirs``) to this
        request and no other. As in the web UIs, it stays merged for the next request with the
        same tags, which then merges nothing; a request with other tags or none swaps it out first
        (exactly), and so does ``unload_lora()``. Direct calls of ``unet`` and ``encode_prompt``
        after a tagged request see the networks as it left them.

        Observers of the run (``inside``), off by default: ``trajectory`` and ``guidance_maps``
        choose steps (``n``: n steps spread from the first to the last; or a list of step indices
        of the run, from 0), ``attention_maps=True`` records a word map per prompt token. They only
        look: the images are the same with them or without.
        """
        image = None if image is None else checked_image(image)
        request = _checked_inputs(self, request, image, mask)
        width, height = _request_size(self, request, image)
        plan = _checked_plan(self, request, width, height)
        mode = _mode(self, request, image, mask, width, height)
        if request.seed is None:
            request = dataclasses.replace(request, seed=secrets.randbelow(2**32))
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
        text, tags = prompts.extract_lora_tags(request.prompt)
        observer = _observer(self, plan, text, trajectory, guidance_maps, attention_maps)
        with self._loras.applied(tags, lora_dirs=self.lora_dirs):
            start = mode.initial_latents(self, plan, generators)
            # The text encoder sees the prompt without its tags; the PNG keeps it as typed.
            latents = self._denoise(plan, start, dataclasses.replace(request, prompt=text), generators,
                                    _step_hook(callback, cancel), observer)
        images = mode.finish(self.decode(latents, decoder=request.decoder))
        label = samplers.SAMPLERS[request.sampler].label
        parameters = [
            request.parameters_text(seed, width, height, sampler_label=label, model=self.name)
            for seed in request.seeds
        ]
        views = {} if observer is None else observer.views(self.preview, (width, height))
        return Generation(images, request.seeds, parameters, **views)

    # ---------------------------------------------------------------- LoRA
    def load_lora(self, source: str | os.PathLike, scale: float = 1.0, *, name: str | None = None, **options: Any) -> str:
        """Merge a LoRA into the weights until :meth:`unload_lora`; returns the name it is loaded under.

        ``source``: a file, a folder, or a Hub repo id (``weight_name=`` picks the file). Several
        LoRAs stack. ``options``: ``text_encoder_scale``, ``unet_scale``, ``weight_name``,
        ``allow_pickle`` (see ``lora.LoraStack.load``).
        """
        return self._loras.load(source, scale, name=name, **options)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one loaded LoRA (or all, with those a request's tags left merged): the weights
        become exactly what they were without it."""
        self._loras.unload(name)

    @property
    def loras(self) -> list[str]:
        """The names of the loaded LoRAs."""
        return self._loras.names

    # ---------------------------------------------------------------- the networks
    def encode_prompt(self, prompt: str, *, clip_skip: int = 1, num_windows: int | None = None) -> torch.Tensor:
        """CLIP hidden states for ``prompt``, with its emphasis applied: ``[1, 77 * windows, D]``.

        The prompt is read as the popular web UIs read it (``prompts``): ``(word:1.3)`` weights,
        ``BREAK``, and windows of 75 tokens cut at a comma near the end. Each window is encoded
        on its own and the windows are concatenated along the sequence; the UNet's
        cross-attention accepts any context length. ``num_windows`` pads with windows of the
        empty prompt, so a prompt and its negative can be stacked.

        The states of the last few prompts are kept (``_RecentPromptStates``): a new seed, or the
        next image of a batch of requests, does not encode the same prompt again.
        """
        windows = self._windows(prompt)
        if num_windows is not None:
            length = self.text_encoder.config.max_position_embeddings
            windows += [prompts.empty_window(self.tokenizer, length=length)] * (num_windows - len(windows))

        def encode() -> torch.Tensor:
            input_ids = torch.tensor([window.ids for window in windows], dtype=torch.long, device=self.device)
            weights = torch.tensor([window.weights for window in windows], device=self.device)
            with torch.inference_mode():
                hidden = self.text_encoder(input_ids, skip_last_layers=clip_skip - 1)
                hidden = prompts.apply_emphasis(hidden, weights)
            return hidden.reshape(1, -1, hidden.shape[-1])

        key = (prompt, clip_skip, len(windows), _weights_state(self.text_encoder))
        return self._prompt_states.get(key, encode)

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
        if self.preview_decoder == "linear":
            return self._latent_rgb(x0_latents / self.vae.config.scaling_factor)
        return self.decode(x0_latents, decoder=self.preview_decoder)

    @property
    def preview_decoder(self) -> str:
        """How :meth:`preview` decodes: ``"tiny"`` (TAESD), ``"full"`` (a small VAE) or ``"linear"``.

        When it is the run's ``decoder``, the last step's preview is the finished image decoded a
        second time (the run ends at σ = 0, where the latents are the last x̂0, up to a multistep
        sampler's correction): a UI can skip it and show the image sooner.
        """
        if self.tiny_vae is not None:
            return "tiny"
        return "full" if self._latent_rgb is None else "linear"

    # ---------------------------------------------------------------- the steps
    def _denoise(
        self,
        plan: SamplingPlan,
        start: _Start,
        request: GenerationRequest,
        generators: list[torch.Generator],
        on_step: StepCallback,
        observer: inside.Observer | None = None,
    ) -> torch.Tensor:
        timestep_cond, scale = _guidance_inputs(self, request)
        # A scale <= 1 runs only the conditional pass (denoisers.guided): the negative prompt is not encoded.
        texts = (request.prompt, request.negative_prompt) if scale > 1 else (request.prompt,)
        num_windows = max(len(self._windows(text)) for text in texts)
        cond, *negative = (
            self.encode_prompt(text, clip_skip=request.clip_skip, num_windows=num_windows).float()
            .expand(len(generators), -1, -1)
            for text in texts
        )
        alphas_cumprod = schedules.alphas_cumprod_from_config(self.scheduler)
        model = start.model(_unet_function(self, timestep_cond))
        denoiser = denoisers.Denoiser(model, alphas_cumprod, self.scheduler.prediction_type)
        guided = denoisers.guided(denoiser, cond=cond, uncond=negative[0] if negative else cond, scale=scale,
                                  rescale=request.guidance_rescale)
        with torch.inference_mode():
            if observer is None:
                latents = samplers.run(plan, start.denoiser(guided, plan), start.latents, generator=generators,
                                       callback=on_step)
            else:
                denoiser = start.denoiser(observer.observing_guidance(guided), plan)
                latents = observer.run(denoiser, start.latents, generator=generators, callback=on_step)
        return start.end(latents)

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


class _RecentPromptStates:
    """The text encoder's states of the last ``SIZE`` prompts, as the web UIs keep their last conditioning.

    A key holds everything the states depend on: the text, clip skip, the window count, and the
    text encoder's weights as ``_weights_state`` sees them, so a LoRA merge never meets states of
    the weights before it. Callers get a copy; one lock makes it safe for concurrent requests.
    """

    SIZE = 8

    def __init__(self) -> None:
        self._states: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            states = self._states.get(key)
            if states is not None:
                self._states.move_to_end(key)
        if states is None:
            states = encode()
            with self._lock:
                self._states[key] = states
                while len(self._states) > self.SIZE:
                    self._states.popitem(last=False)
        with torch.inference_mode():
            return states.clone()


def _weights_state(network: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Each parameter's storage and version counter: an in-place change (``copy_``, as LoRA merges and
    ``load_state_dict`` make) bumps the version, and ``to()`` or new weights change the storage."""
    return tuple((parameter.data_ptr(), parameter._version) for parameter in network.parameters())


def _request_size(pipe: StableDiffusion, request: GenerationRequest, image: Image.Image | None) -> tuple[int, int]:
    """The request's size; by default the native size, or the input's aspect ratio at the native area."""
    width, height = request.width, request.height
    if image is None:
        return width or pipe.native_size, height or pipe.native_size
    if width is None and height is None:
        return native_area_size(image.size, pipe.native_size)
    if width is None:
        width = max(8, round(image.width * height / image.height / 8) * 8)
    elif height is None:
        height = max(8, round(image.height * width / image.width / 8) * 8)
    return width, height

def _checked_plan(pipe: StableDiffusion, request: GenerationRequest, width: int, height: int) -> SamplingPlan:
    """Check ``request`` against this model's limits; return its sampling plan (which checks sampler and steps)."""
    if width * height > pipe.max_pixels:
        side = int(pipe.max_pixels**0.5) // 8 * 8
        raise InvalidSetting(
            "size",
            f"{width}x{height} is {width * height} pixels, over this server's budget of {pipe.max_pixels} "
            f"(e.g. {side}x{side}). Use a smaller size.",
        )
    if request.num_images > pipe.max_images:
        raise InvalidSetting("num_images", f"must be from 1 to {pipe.max_images}, got {request.num_images}.")
    max_skip = pipe.text_encoder.config.num_layers - 1
    if request.clip_skip > max_skip:
        raise InvalidSetting("clip_skip", f"must be from 1 (last layer) to {max_skip} for this text encoder, got {request.clip_skip}.")
    if request.decoder == "tiny" and pipe.tiny_vae is None:
        raise InvalidSetting(
            "decoder",
            "'tiny' needs the tiny autoencoder: load the model with tiny_vae='madebyollin/taesd' "
            "(or a local TAESD folder), or use the full decoder.",
        )
    for setting, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        windows = len(pipe._windows(text))
        if windows > MAX_PROMPT_WINDOWS:
            raise InvalidSetting(
                setting, f"is too long: {windows * 75} tokens or more, the limit is {MAX_PROMPT_WINDOWS * 75}. Shorten it."
            )
    strength = 1.0 if request.strength is None else request.strength
    return samplers.plan_sampling(pipe.scheduler, request.sampler, request.steps, strength=strength)


# The keyword options of ``generate`` itself; the mode wrappers' other options are the request's.
_RUN_OPTIONS = ("callback", "cancel", "trajectory", "guidance_maps", "attention_maps")


def _request_and_run_options(
    prompt: str, negative_prompt: str, options: dict[str, Any], **defaults: Any
) -> tuple[GenerationRequest, dict[str, Any]]:
    """A mode wrapper's options split: the request (``defaults`` under the caller's settings), and
    the options of the run (``_RUN_OPTIONS``)."""
    run = {key: options.pop(key) for key in _RUN_OPTIONS if key in options}
    return GenerationRequest(prompt, negative_prompt, **{**defaults, **options}), run


def _checked_inputs(
    pipe: StableDiffusion, request: GenerationRequest, image: Image.Image | None, mask: object
) -> GenerationRequest:
    """Check that the inputs suit the request and the UNet; give inpainting's unset strength and
    mask blur their defaults (1 and 0), which its PNG parameters state as the web UIs do."""
    latent, channels = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
    if channels not in (latent, 2 * latent + 1):
        raise ValueError(
            f"This UNet takes {channels} input channels: only {latent} (a regular model) and "
            f"{2 * latent + 1} (an inpainting model: latents, mask and masked image) are supported."
        )
    if mask is None:
        if channels != latent:
            raise ValueError(f"{pipe.name} is an inpainting model: use inpaint() with an image and a mask.")
        if request.mask_blur is not None or request.paste_back:
            setting = "mask_blur" if request.mask_blur is not None else "paste_back"
            raise InvalidSetting(setting, "applies to inpainting only: give a mask, or leave it out.")
        if image is None and request.strength is not None:
            raise InvalidSetting("strength", "applies to image-to-image only: give an image, or leave strength out.")
        return request
    if image is None:
        raise ValueError("A mask needs the image it masks: give the image as well.")
    strength = 1.0 if request.strength is None else request.strength
    return dataclasses.replace(request, strength=strength, mask_blur=request.mask_blur or 0)


def _mode(
    pipe: StableDiffusion, request: GenerationRequest, image: Image.Image | None, mask: object, width: int, height: int
) -> _Mode:
    if image is None:
        return _TextToImage(width, height)
    pixels = _pixels(image, width, height)
    if mask is None:
        return _ImageToImage(pixels)
    soft_mask = inpainting.blurred(inpainting.read_mask(mask, size=image.size), request.mask_blur)
    factor = pipe.vae.config.downsampling_factor
    pixel_mask, latent_mask = inpainting.model_masks(soft_mask, width, height, downsampling_factor=factor)
    paste = (image, soft_mask) if request.paste_back else None
    return _Inpaint(pixels, pixel_mask, latent_mask, full_strength=request.strength == 1, paste=paste)


def _latent_shape(pipe: StableDiffusion, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
    factor = pipe.vae.config.downsampling_factor
    return batch, pipe.vae.config.latent_channels, height // factor, width // factor


def _guidance_inputs(pipe: StableDiffusion, request: GenerationRequest) -> tuple[torch.Tensor | None, float]:
    """The UNet's guidance embedding (or None) and the scale of classifier-free guidance."""
    guidance_dim = pipe.unet.config.time_cond_proj_dim
    if guidance_dim is None:
        return None, request.guidance_scale
    # A guidance-distilled UNet (LCM, Luo et al. 2023, §4.2) takes the guidance weight as an input
    # beside the timestep and needs no guidance batch; diffusers' LCM pipeline feeds
    # w = guidance_scale - 1 and ignores the negative prompt.
    weight = torch.tensor([request.guidance_scale - 1.0])
    return guidance_scale_embedding(weight, guidance_dim), 1.0


def _unet_function(pipe: StableDiffusion, timestep_cond: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    # The sampler's arithmetic stays in float32 whatever the network's precision: small
    # differences of large numbers (x - σ·ε at high σ) lose the image in bfloat16.
    unet, dtype = pipe.unet, pipe.dtype
    if timestep_cond is not None:
        timestep_cond = timestep_cond.to(pipe.device, dtype)

    def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t, context.to(dtype), timestep_cond=timestep_cond).float()

    return model


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image as the VAE's input ``[1, 3, height, width]`` in [-1, 1]."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return pil_to_tensor(image)[None]


def _observer(
    pipe: StableDiffusion,
    plan: SamplingPlan,
    prompt: str,
    trajectory: inside.StepChoice,
    guidance_maps: inside.StepChoice,
    attention_maps: bool,
) -> inside.Observer | None:
    """The run's observer, or None when it records nothing (then it runs exactly the plain path)."""
    if not (trajectory or guidance_maps or attention_maps):
        return None
    tokens = inside.prompt_tokens(pipe.tokenizer, pipe._windows(prompt)) if attention_maps else None
    return inside.Observer(plan, trajectory=trajectory, guidance_maps=guidance_maps, attention_tokens=tokens)


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
