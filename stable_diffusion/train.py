"""Training a latent diffusion model: the VAE, then the UNet (and, optionally, the text encoder).

Two stages, each one small object (``VAEStage``, ``DiffusionStage``: the networks it trains, its
loss on a batch, what it does before saving) run by the same loop on 🤗 Accelerate (device
placement, mixed precision, gradient accumulation, several GPUs or machines with
``accelerate launch`` and no change here):

* ``vae``: the autoencoder alone, on reconstruction (L1) plus a small KL term towards N(0, I)
  (Rombach et al. 2022, sec. 3.1; Kingma & Welling 2014, eq. 10); afterwards the latent scaling
  factor is set to 1/std of the latents (Rombach et al. 2022, sec. 4.3.2).
* ``diffusion``: the UNet on the simplified objective ‖ε − ε_θ(√ᾱ_t·x0 + √(1−ᾱ_t)·ε, t, c)‖² with t
  uniform (Ho et al. 2020, eq. 14), or its v-target for v-prediction models (Salimans & Ho 2022);
  captions are replaced by the empty one with probability 0.1 so the same network also learns the
  unconditional model that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2).

Both keep an exponential moving average of the weights, write checkpoints in the diffusers layout
that ``hub.load`` reads (the averaged weights, plus the optimizer state to resume from), and end by
saving the averaged model to ``--output``. The command line trains any model on a folder of images
with same-name ``.txt`` captions, e.g. SD 1.5 on 8 GPUs::

    accelerate launch --multi_gpu --num_processes 8 -m stable_diffusion.train diffusion \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data my-captioned-images/ --output sd15-finetuned \\
        --resolution 512 --batch-size 4 --learning-rate 1e-5 --mixed-precision fp16 --steps 10000

From Python, ``train`` takes any dataset of ``{"pixels", "caption"}`` items. The bundled tiny
model is built and trained on its shapes dataset by ``python -m tiny_shapes`` (the ``tiny_shapes``
package, which uses this one).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import math
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import CLIPTokenizer

from . import hub
from .devices import parse_dtype
from .images import pil_to_tensor
from .pipelines import StableDiffusion
from .schedules import alphas_cumprod_from_config, check_prediction_type, q_sample
from .vae import AutoencoderKL, DiagonalGaussian

logger = logging.getLogger(__name__)

__all__ = [
    "EMA",
    "STAGES",
    "CaptionedImageFolder",
    "DiffusionStage",
    "Stage",
    "TrainConfig",
    "VAEStage",
    "add_stage_commands",
    "command_line",
    "config_options",
    "diffusion_loss",
    "drop_captions",
    "estimate_scaling_factor",
    "kl_divergence",
    "main",
    "run_stage",
    "tokenize",
    "train",
    "vae_loss",
]

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATE_FOLDER = "training_state"  # inside a checkpoint: what `accelerate` needs to resume
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training stage (``kl_weight`` is the VAE's; the caption and text-encoder options the UNet's)."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    ema_decay: float = 0.999
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    kl_weight: float = 1e-5
    resolution: int | None = None  # None: the model's native size
    # Each epoch in a new random order. A dataset whose items are already independent random
    # draws can be read in order instead, so that resuming replays exactly the same batches.
    shuffle: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns the average off), got {self.ema_decay}.")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The precision of the networks that only run forward: half precision is enough when training mixed."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision, torch.float32)

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or a cosine decay to zero at ``steps``."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------- data
class CaptionedImageFolder(Dataset):
    """Every image of ``folder`` (recursively) with the caption in the ``.txt`` file of the same name.

    Images are made RGB, resized so the shorter side is ``resolution`` and centre-cropped square.
    Items are ``{"pixels": [3, resolution, resolution] in [-1, 1], "caption": str}``.
    """

    def __init__(self, folder: str | Path, *, resolution: int) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder} is not a folder of images with .txt captions.")
        self.resolution = resolution
        images = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise ValueError(
                f"{len(uncaptioned)} image(s) in {self.folder} have no caption file, e.g. {uncaptioned[0].name} "
                f"needs {uncaptioned[0].with_suffix('.txt').name}."
            )
        if not images:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in {self.folder}.")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        path = self.images[index]
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = ImageOps.fit(image, (self.resolution, self.resolution), Image.BICUBIC)
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        return {"pixels": pil_to_tensor(image), "caption": caption}


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], *, length: int) -> torch.Tensor:
    """Token ids [B, length]: BOS, the caption's tokens (truncated), EOS, padding, as the pipeline encodes a prompt."""
    return tokenizer(
        list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


def drop_captions(captions: Sequence[str], probability: float, *, generator: torch.Generator | None = None) -> list[str]:
    """Each caption replaced by "" with ``probability`` (Ho & Salimans 2022, Algorithm 1)."""
    drop = torch.rand(len(captions), generator=generator, device=None if generator is None else generator.device) < probability
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]


# ---------------------------------------------------------------------------------------------- objectives
def diffusion_loss(
    unet: nn.Module,
    x0: torch.Tensor,
    context: torch.Tensor,
    *,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The simplified diffusion loss at timesteps ``t`` [B] and noise ``noise`` (Ho et al. 2020, eq. 14).

    ε-prediction regresses ``noise``; v-prediction regresses v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
    (Salimans & Ho 2022, sec. 4), the target SD 2.x's 768-px model was trained on.
    """
    check_prediction_type(prediction_type)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    if prediction_type == "epsilon":
        target = noise
    else:
        alpha_cumprod = alphas_cumprod.to(x0.device)[t].reshape(-1, *([1] * (x0.ndim - 1)))
        target = alpha_cumprod.sqrt() * noise - (1 - alpha_cumprod).sqrt() * x0
    return F.mse_loss(unet(x_t, t, context).float(), target.float())


def kl_divergence(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), averaged over latent elements (Kingma & Welling 2014, app. B)."""
    return 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()


def vae_loss(
    images: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, *, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, KL): the mean L1 error of a reconstruction through a posterior sample, plus the weighted KL.

    L1 rather than L2 keeps edges sharp (Esser et al. 2021, sec. 3.2, use it as the pixel term);
    the small KL weight only keeps the latents near unit scale, as in the KL-f8 autoencoder of SD.
    """
    reconstruction_loss = F.l1_loss(reconstruction.float(), images.float())
    kl = kl_divergence(posterior)
    return reconstruction_loss + kl_weight * kl, reconstruction_loss, kl


class _Autoencoding(nn.Module):
    """The VAE's training pass (encode, sample, decode) as one ``forward``, which is what
    DistributedDataParallel and Accelerate's autocast wrap; returns (reconstruction, mean, logvar)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        posterior = self.vae.encode(images)
        return self.vae.decode(posterior.sample(generator)), posterior.mean, posterior.logvar


class EMA(nn.Module):
    """Exponential moving average of a network's weights, the copy that is saved and sampled from.

    Decay ramps up as min(decay, (1 + n)/(10 + n)) after n updates (the warm-up of TensorFlow's
    ExponentialMovingAverage, also diffusers' EMAModel default), so early averages are not
    dominated by the random initial weights. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.averaged = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        averaged = list(self.averaged.parameters())
        online = [p.detach().to(a.dtype) for p, a in zip(model.parameters(), averaged)]
        # a ← a + (1 − decay)·(p − a)
        torch._foreach_lerp_(averaged, online, 1.0 - decay)
        for a, b in zip(self.averaged.buffers(), model.buffers()):
            a.copy_(b)
        self.num_updates += 1


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, loader: Iterable[dict], *, batches: int, device: torch.device) -> float:
    """1 / std of the VAE's latents over a few batches: unit-variance inputs for the diffusion model (Rombach et al. 2022, sec. 4.3.2)."""
    samples = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        samples.append(vae.encode(batch["pixels"].to(device, next(vae.parameters()).dtype)).sample().float().flatten())
    return float(1.0 / torch.cat(samples).std())


# ---------------------------------------------------------------------------------------------- stages
class Stage(ABC):
    """One training stage: the networks it trains and those it only runs, its loss on a batch, its last step before saving.

    ``trained`` networks are optimised in float32, averaged by the EMA and saved; ``frozen`` ones
    only run forward, in ``config.frozen_dtype``; networks in neither stay where they are (the
    VAE stage leaves the text encoder and the UNet on the CPU). ``forward_modules`` are what
    Accelerate prepares and ``loss`` calls: the trained networks, unless a stage trains one
    through a wrapper.
    """

    name: str

    def __init__(
        self,
        pipe: StableDiffusion,
        config: TrainConfig,
        *,
        device: torch.device,
        trained: dict[str, nn.Module],
        frozen: dict[str, nn.Module],
        forward_modules: dict[str, nn.Module] | None = None,
    ) -> None:
        self.pipe, self.config, self.device = pipe, config, device
        self.trained, self.frozen = trained, frozen
        self.forward_modules = trained if forward_modules is None else forward_modules

    def place(self) -> None:
        """Move the networks to the device, in their precision and train/eval mode."""
        for network in self.trained.values():
            network.to(self.device, torch.float32).requires_grad_(True).train()
        for network in self.frozen.values():
            network.to(self.device, self.config.frozen_dtype).requires_grad_(False).eval()

    @staticmethod
    @abstractmethod
    def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
        """Add the command-line options of this stage's own ``TrainConfig`` fields."""

    @abstractmethod
    def loss(
        self, models: dict[str, nn.Module], batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss to minimise, named parts to show) on ``batch``, through the prepared ``forward_modules``."""

    def finish(self, result: StableDiffusion, loader: Iterable[dict]) -> StableDiffusion:
        """``result`` (the pipeline with the averaged networks swapped in) as it is saved."""
        return result


class VAEStage(Stage):
    """The autoencoder alone, on ``vae_loss``; then its latent scaling factor is set from the data."""

    name = "vae"

    def __init__(self, pipe: StableDiffusion, config: TrainConfig, *, device: torch.device) -> None:
        # Only the VAE goes to the device. It is trained through the wrapper; the average and the
        # saved model track the VAE inside.
        super().__init__(pipe, config, device=device, trained={"vae": pipe.vae}, frozen={},
                         forward_modules={"vae": _Autoencoding(pipe.vae)})

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
        parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)

    def loss(
        self, models: dict[str, nn.Module], batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixels"].to(self.device)
        reconstruction, mean, logvar = models["vae"](pixels, generator)
        total, l1, kl = vae_loss(pixels, reconstruction, DiagonalGaussian(mean, logvar), kl_weight=self.config.kl_weight)
        return total, {"l1": l1.item(), "kl": kl.item()}

    def finish(self, result: StableDiffusion, loader: Iterable[dict]) -> StableDiffusion:
        factor = estimate_scaling_factor(result.vae, loader, batches=16, device=self.device)
        result.vae.config = dataclasses.replace(result.vae.config, scaling_factor=factor)
        logger.info("latent scaling factor: %.5f", factor)
        return result


class DiffusionStage(Stage):
    """The UNet (and the text encoder with ``config.train_text_encoder``) on ``diffusion_loss``, with caption dropout.

    The frozen VAE encodes the images to latents, scaled by the factor the VAE stage set.
    """

    name = "diffusion"

    def __init__(self, pipe: StableDiffusion, config: TrainConfig, *, device: torch.device) -> None:
        text_encoder = {"text_encoder": pipe.text_encoder}
        super().__init__(
            pipe, config, device=device,
            trained={"unet": pipe.unet} | (text_encoder if config.train_text_encoder else {}),
            frozen={"vae": pipe.vae} | ({} if config.train_text_encoder else text_encoder),
        )
        self.alphas_cumprod = alphas_cumprod_from_config(pipe.scheduler).to(device)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
        parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                            help="probability of training on the empty caption, for classifier-free guidance")
        parser.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")

    def loss(
        self, models: dict[str, nn.Module], batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pipe, device = self.pipe, self.device
        with torch.no_grad():
            posterior = pipe.vae.encode(batch["pixels"].to(device, self.config.frozen_dtype))
            latents = posterior.sample(generator).float() * pipe.vae.config.scaling_factor
        captions = drop_captions(batch["caption"], self.config.caption_dropout, generator=generator)
        input_ids = tokenize(pipe.tokenizer, captions, length=pipe.text_encoder.config.max_position_embeddings).to(device)
        with torch.set_grad_enabled(self.config.train_text_encoder):
            context = models.get("text_encoder", pipe.text_encoder)(input_ids)
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        loss = diffusion_loss(
            models["unet"], latents, context.float(), t=t, noise=noise,
            alphas_cumprod=self.alphas_cumprod, prediction_type=pipe.scheduler.prediction_type,
        )
        return loss, {}


STAGES: dict[str, type[VAEStage] | type[DiffusionStage]] = {stage.name: stage for stage in (VAEStage, DiffusionStage)}


# ---------------------------------------------------------------------------------------------- the loop
def _checkpoints(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("step-*") if (p / STATE_FOLDER / PROGRESS_FILE).is_file()), key=lambda p: p.name)


def _resume(accelerator: Accelerator, resume: str, checkpoint_dir: Path) -> int:
    """Load the training state of checkpoint ``resume`` (a step-N folder, or "latest" in ``checkpoint_dir``); its step."""
    if resume == "latest":
        found = _checkpoints(checkpoint_dir)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint in {checkpoint_dir}.")
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / STATE_FOLDER / PROGRESS_FILE).is_file():
            raise ValueError(f"{checkpoint} is not a checkpoint (no {STATE_FOLDER}/{PROGRESS_FILE}); give a step-N folder or 'latest'.")
    accelerator.load_state(str(checkpoint / STATE_FOLDER))
    step = json.loads((checkpoint / STATE_FOLDER / PROGRESS_FILE).read_text())["step"]
    logger.info("resumed from %s at step %d", checkpoint, step)
    return step


class _Randomness:
    """The generator of the loop's own draws (timesteps, noise, caption dropout, posterior samples).

    Separate from the global one, which the data loader draws from whenever it starts an epoch,
    so that a resumed run draws exactly what the uninterrupted run would have; ``state_dict`` and
    ``load_state_dict`` let ``accelerator.save_state`` checkpoint it.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device).manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


class _Progress:
    """The progress bar and the log: the loss smoothed over about 50 steps, the learning rate, the stage's parts."""

    def __init__(self, stage: str, config: TrainConfig, *, step: int, enabled: bool) -> None:
        self.stage, self.config = stage, config
        self.bar = tqdm(total=config.steps, initial=step, desc=stage, disable=not enabled)
        self.smoothed: float | None = None

    def update(self, step: int, loss: float, parts: dict[str, float]) -> None:
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{self.config.learning_rate_at(step):.1e}",
                             **{k: f"{v:.4f}" for k, v in parts.items()})
        if step % self.config.log_every == 0:
            logger.info("%s step %d/%d loss %.5f (smoothed %.5f) %s",
                        self.stage, step, self.config.steps, loss, self.smoothed, parts)

    def close(self) -> None:
        self.bar.close()


def _batches(accelerator: Accelerator, loader: DataLoader, *, skip: int) -> Iterator[dict]:
    """The loader's batches, epoch after epoch without end.

    Resuming after ``skip`` batches, the first epoch starts where it was left (exactly for a
    dataset read in order; shuffled, within an epoch of the same length).
    """
    yield from accelerator.skip_first_batches(loader, skip % len(loader)) if skip else loader
    while True:
        yield from loader


def _loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """Full batches only (every step sees ``batch_size`` items), shuffled each epoch unless ``config.shuffle`` is off."""
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers, drop_last=True,
                        shuffle=config.shuffle)
    if len(loader) == 0:
        raise ValueError(f"The dataset's {len(dataset)} items make no full batch of {config.batch_size}: lower the batch size.")
    return loader


def _averaged(pipe: StableDiffusion, trained: dict[str, nn.Module], averages: dict[str, EMA]) -> StableDiffusion:
    """The pipeline with the averaged copies of the trained networks swapped in (the networks themselves without EMA)."""
    return dataclasses.replace(pipe, **{name: averages[name].averaged if averages else net for name, net in trained.items()})


def _save_checkpoint(
    accelerator: Accelerator, folder: Path, pipe: StableDiffusion, *, step: int, stage: str, keep: int
) -> None:
    """``folder/step-N``: the training state to resume from, and ``pipe`` as a model that ``hub.load`` reads.

    Only the newest ``keep`` checkpoints are kept.
    """
    checkpoint = folder / f"step-{step:07d}"
    accelerator.save_state(str(checkpoint / STATE_FOLDER))
    if accelerator.is_main_process:
        hub.save(pipe, checkpoint)
        (checkpoint / STATE_FOLDER / PROGRESS_FILE).write_text(json.dumps({"step": step, "stage": stage}))
        for old in _checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def train(
    pipe: StableDiffusion,
    dataset: Dataset,
    *,
    stage: str,
    config: TrainConfig,
    output: str | Path,
    checkpoint_dir: str | Path | None = None,
    resume: str | None = None,
    save_dtype: torch.dtype | None = None,
) -> StableDiffusion:
    """Train one stage of ``pipe`` on ``dataset`` and save the averaged model to ``output``; returns it.

    ``stage`` is "vae" (the autoencoder) or "diffusion" (the UNet, plus the text encoder when
    ``config.train_text_encoder``). Checkpoints go to ``checkpoint_dir`` (default
    ``output/checkpoints``) as ``step-N`` folders; ``resume`` is one of them or "latest".
    ``save_dtype`` converts the final model before saving (e.g. float16 halves its files);
    checkpoints keep the training precision.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}: choose one of {', '.join(STAGES)}.")
    output = Path(output)
    checkpoint_dir = output / "checkpoints" if checkpoint_dir is None else Path(checkpoint_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    set_seed(config.seed, device_specific=True)
    job = STAGES[stage](pipe, config, device=accelerator.device)
    job.place()
    averages = {name: EMA(net, decay=config.ema_decay) for name, net in job.trained.items()} if config.ema_decay else {}
    parameters = [p for net in job.trained.values() for p in net.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    *prepared, optimizer, loader = accelerator.prepare(*job.forward_modules.values(), optimizer, _loader(dataset, config))
    models = dict(zip(job.forward_modules, prepared))
    for average in averages.values():
        average.to(accelerator.device)
        accelerator.register_for_checkpointing(average)
    randomness = _Randomness(accelerator.device, config.seed * 1000 + accelerator.process_index)
    accelerator.register_for_checkpointing(randomness)
    step = 0 if resume is None else _resume(accelerator, resume, checkpoint_dir)

    batches = _batches(accelerator, loader, skip=step * config.gradient_accumulation_steps)
    progress = _Progress(stage, config, step=step, enabled=accelerator.is_local_main_process)
    while step < config.steps:
        batch = next(batches)  # before `accumulate`, which syncs gradients early at the end of an epoch
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate_at(step)
        with accelerator.accumulate(*models.values()):
            with accelerator.autocast():
                loss, parts = job.loss(models, batch, randomness.generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        for name, average in averages.items():
            average.update(job.trained[name])
        progress.update(step, loss.item(), parts)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(accelerator, checkpoint_dir, _averaged(pipe, job.trained, averages),
                             step=step, stage=stage, keep=config.keep_checkpoints)
    progress.close()

    result = job.finish(_averaged(pipe, job.trained, averages), loader)
    if save_dtype is not None:
        result = result.to(dtype=save_dtype)
    if accelerator.is_main_process:
        hub.save(result, output)
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------- command line
# The stages' commands; their default learning rates and lengths are those the bundled tiny model
# was trained with.
_COMMANDS = {
    "vae": ("train the autoencoder", 1e-3, 1500),
    "diffusion": ("train the UNet (and text encoder) on the diffusion loss", 5e-4, 8000),
}


def add_stage_commands(commands: argparse._SubParsersAction) -> dict[str, argparse.ArgumentParser]:
    """Add a ``vae`` and a ``diffusion`` command with every option of ``TrainConfig`` (all but the data)."""
    defaults = TrainConfig()
    parsers = {}
    for stage, (help_text, learning_rate, steps) in _COMMANDS.items():
        sub = parsers[stage] = commands.add_parser(stage, help=help_text)
        sub.add_argument("--model", required=True, help="the model to start from: local diffusers folder or Hub repo id")
        sub.add_argument("--output", required=True, type=Path, help="where the trained model is saved (diffusers layout)")
        sub.add_argument("--checkpoint-dir", type=Path, help="where step-N checkpoints go (default: OUTPUT/checkpoints)")
        sub.add_argument("--resume", help="a step-N checkpoint folder, or 'latest' in the checkpoint dir")
        sub.add_argument("--resolution", type=int, help="training image side (default: the model's native size)")
        sub.add_argument("--steps", type=int, default=steps)
        sub.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process, per accumulation step")
        sub.add_argument("--learning-rate", type=float, default=learning_rate)
        sub.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
        sub.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
        sub.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule)
        sub.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="0 turns the weight average off")
        sub.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps)
        sub.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=defaults.mixed_precision)
        sub.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="0: no clipping")
        sub.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
        sub.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
        sub.add_argument("--log-every", type=int, default=defaults.log_every)
        sub.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data loader processes")
        sub.add_argument("--seed", type=int, default=defaults.seed)
        sub.add_argument("--save-dtype", help="precision of the saved model: float32 (default), float16, bfloat16")
        STAGES[stage].add_arguments(sub, defaults)
    return parsers


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields that the command line set."""
    return {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, field.name, None) is not None
    }


def run_stage(args: argparse.Namespace, config: TrainConfig, make_dataset: Callable[..., Dataset]) -> StableDiffusion:
    """Train the stage ``args.command`` of ``--model`` on ``make_dataset(resolution=...)`` and save it to ``--output``."""
    pipe = hub.load(args.model, device="cpu", dtype=torch.float32)
    dataset = make_dataset(resolution=config.resolution or pipe.native_size)
    return train(pipe, dataset, stage=args.command, config=config, output=args.output,
                 checkpoint_dir=args.checkpoint_dir, resume=args.resume, save_dtype=parse_dtype(args.save_dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stable_diffusion.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for sub in add_stage_commands(parser.add_subparsers(dest="command", required=True)).values():
        sub.add_argument("--data", required=True, type=Path, help="a folder of images with same-name .txt captions")
    return parser


def command_line(parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], Any]) -> int:
    """Parse ``argv`` and ``run`` the command with logging on; bad input is one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ValueError, hub.ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _train_on_folder(args: argparse.Namespace) -> StableDiffusion:
    return run_stage(args, TrainConfig(**config_options(args)), functools.partial(CaptionedImageFolder, args.data))


def main(argv: list[str] | None = None) -> int:
    return command_line(build_parser(), argv, _train_on_folder)


if __name__ == "__main__":
    sys.exit(main())
