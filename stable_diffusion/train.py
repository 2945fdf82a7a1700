"""Training a latent diffusion model: the VAE, then the UNet (and, optionally, the text encoder).

Two stages, each run by the same loop on 🤗 Accelerate (device placement, mixed precision, gradient
accumulation, several GPUs or machines with ``accelerate launch`` and no change here):

* ``vae``: the autoencoder alone, on reconstruction (L1) plus a small KL term towards N(0, I)
  (Rombach et al. 2022, sec. 3.1; Kingma & Welling 2014, eq. 10); afterwards the latent scaling
  factor is set to 1/std of the latents (Rombach et al. 2022, sec. 4.3.2).
* ``diffusion``: the UNet on the simplified objective ‖ε − ε_θ(√ᾱ_t·x0 + √(1−ᾱ_t)·ε, t, c)‖² with t
  uniform (Ho et al. 2020, eq. 14), or its v-target for v-prediction models (Salimans & Ho 2022);
  captions are replaced by the empty one with probability 0.1 so the same network also learns the
  unconditional model that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2).

Both keep an exponential moving average of the weights, write checkpoints in the diffusers layout
that ``hub.load`` reads (the averaged weights, plus the optimizer state to resume from), and end by
saving the averaged model to ``--output``. Data is the on-the-fly shapes dataset (``--data shapes``)
or a folder of images with same-name ``.txt`` captions. ``init`` builds a fresh tiny model for the
shapes (a BPE vocabulary learned from the captions, random weights). The tiny model of
``models/tiny-shapes`` was made with (55 minutes on 2 CPU cores shared with other work)::

    python -m stable_diffusion.train init --output runs/tiny-shapes/init
    python -m stable_diffusion.train vae --model runs/tiny-shapes/init --output runs/tiny-shapes/vae
    python -m stable_diffusion.train diffusion --model runs/tiny-shapes/vae --output models/tiny-shapes \\
        --train-text-encoder --save-dtype float16 --checkpoint-dir runs/tiny-shapes/checkpoints

and SD 1.5 is fine-tuned on a folder the same way, e.g. on 8 GPUs::

    accelerate launch --multi_gpu --num_processes 8 -m stable_diffusion.train diffusion \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data my-captioned-images/ --output sd15-finetuned \\
        --resolution 512 --batch-size 4 --learning-rate 1e-5 --mixed-precision fp16 --steps 10000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import math
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
from .clip import CLIPTextConfig, CLIPTextModel
from .devices import parse_dtype
from .pipelines import StableDiffusion
from .schedules import SchedulerConfig, alphas_cumprod_from_config, q_sample
from .images import pil_to_tensor
from .shapes import ShapesDataset, all_combinations
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, DiagonalGaussian, VAEConfig

logger = logging.getLogger(__name__)

__all__ = [
    "EMA",
    "CaptionedImageFolder",
    "TrainConfig",
    "diffusion_loss",
    "drop_captions",
    "kl_divergence",
    "learn_bpe_tokenizer",
    "main",
    "make_dataset",
    "tiny_shapes_pipeline",
    "tokenize",
    "train",
    "vae_loss",
]

STAGES = ("vae", "diffusion")
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


def make_dataset(data: str, *, resolution: int, seed: int = 0) -> Dataset:
    """``"shapes"``: the on-the-fly shapes dataset (training split); anything else: a captioned image folder."""
    if data == "shapes":
        return ShapesDataset(resolution=resolution, split="train", seed=seed)
    return CaptionedImageFolder(data, resolution=resolution)


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
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        alpha_cumprod = alphas_cumprod.to(x0.device)[t].reshape(-1, *([1] * (x0.ndim - 1)))
        target = alpha_cumprod.sqrt() * noise - (1 - alpha_cumprod).sqrt() * x0
    else:
        raise ValueError(f"Unknown prediction type {prediction_type!r}: choose epsilon or v_prediction.")
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


# ---------------------------------------------------------------------------------------------- from scratch
def _byte_characters() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (Radford et al. 2019), which CLIP's BPE runs on.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...) are
    moved to code points 256 and up, so that every token is a visible string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def learn_bpe_tokenizer(texts: Iterable[str], folder: str | Path, *, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn byte-pair merges (Sennrich et al. 2016) from ``texts`` and save a CLIP tokenizer to ``folder``.

    The vocabulary is CLIP's layout: the 256 byte symbols, the same with the end-of-word mark
    ``</w>``, the merged symbols in the order learned, then ``<|startoftext|>`` and
    ``<|endoftext|>``. Merging continues until every word of ``texts`` is a single token, so a
    caption costs one token per word; unseen words still encode, byte by byte. Returns the
    ``transformers.CLIPTokenizer`` read back from ``vocab.json`` and ``merges.txt``.
    """
    byte_symbols = _byte_characters()
    # CLIP lower-cases and splits words, single digits and runs of punctuation apart.
    word_counts = Counter(
        word for text in texts for word in re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower())
    )
    spellings = {}
    for word in word_counts:
        symbols = [byte_symbols[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        spellings[word] = symbols
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in spellings.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        # Most frequent pair; ties broken by the pair itself so the vocabulary is reproducible.
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        for word, symbols in spellings.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spellings[word] = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    token_ids = {token: i for i, token in enumerate(vocab)}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(token_ids, ensure_ascii=False, indent=1), encoding="utf-8")
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def tiny_shapes_pipeline(*, resolution: int = 32, seed: int = 0) -> StableDiffusion:
    """A fresh, randomly initialised tiny Stable Diffusion for the shapes dataset: 5.3 M parameters.

    Same architecture family as SD at toy size: a 3-level VAE (4× downsampling: 32 px -> 8×8×4
    latents), a 3-layer text transformer over 16 positions with a vocabulary learned from the
    captions, and a 2-level UNet with cross-attention at both levels and in the middle block.
    SD's noise schedule; the VAE's scaling factor is set after VAE training.
    """
    if resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4 (the VAE downsamples 4×), got {resolution}.")
    max_tokens = 16  # the longest caption is 9 tokens with BOS and EOS
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = learn_bpe_tokenizer((c.caption for c in all_combinations()), folder, model_max_length=max_tokens)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4,
        max_position_embeddings=max_tokens, hidden_act="gelu",
    )
    unet_config = UNetConfig(
        block_out_channels=(64, 128), layers_per_block=1, attention_levels=(True, True), num_heads=(4, 4),
        cross_attention_dim=text_config.hidden_size, sample_size=resolution // 4,
    )
    vae_config = VAEConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=resolution,
        scaling_factor=1.0,
    )
    with torch.random.fork_rng():  # seeded weights without touching the caller's random state
        torch.manual_seed(seed)
        networks = {"text_encoder": CLIPTextModel(text_config), "unet": UNet(unet_config), "vae": AutoencoderKL(vae_config)}
    return StableDiffusion(**networks, tokenizer=tokenizer, scheduler=SchedulerConfig(), name="tiny-shapes")


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, loader: Iterable[dict], *, batches: int, device: torch.device) -> float:
    """1 / std of the VAE's latents over a few batches: unit-variance inputs for the diffusion model (Rombach et al. 2022, sec. 4.3.2)."""
    samples = []
    for i, batch in enumerate(loader):
        if i == batches:
            break
        samples.append(vae.encode(batch["pixels"].to(device, next(vae.parameters()).dtype)).sample().float().flatten())
    return float(1.0 / torch.cat(samples).std())


# ---------------------------------------------------------------------------------------------- the loop
def _checkpoints(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("step-*") if (p / STATE_FOLDER / PROGRESS_FILE).is_file()), key=lambda p: p.name)


def _resolve_resume(resume: str, checkpoint_dir: Path) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FOLDER / PROGRESS_FILE).is_file():
            raise ValueError(f"{path} is not a checkpoint (no {STATE_FOLDER}/{PROGRESS_FILE}); give a step-N folder or 'latest'.")
        return path
    found = _checkpoints(checkpoint_dir)
    if not found:
        raise ValueError(f"--resume latest: no checkpoint in {checkpoint_dir}.")
    return found[-1]


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


def _snapshot(pipe: StableDiffusion, networks: dict[str, nn.Module]) -> StableDiffusion:
    """The pipeline with ``networks`` (the averaged or online copies of the trained ones) swapped in."""
    return dataclasses.replace(pipe, **networks)


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
    device = accelerator.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

    if stage == "vae":
        trained = {"vae": pipe.vae}
        # Trained through the wrapper; the average and the saved model track the VAE inside.
        forward_modules = {"vae": _Autoencoding(pipe.vae)}
    else:
        trained = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if config.train_text_encoder else {})
        forward_modules = trained
    # The VAE stage needs only the VAE on the device; the diffusion stage runs all three.
    for name in ("vae",) if stage == "vae" else ("text_encoder", "unet", "vae"):
        network = getattr(pipe, name)
        if name in trained:
            network.to(device, torch.float32).requires_grad_(True).train()
        else:
            # Frozen networks only run forward: half precision is enough when training mixed.
            network.to(device, frozen_dtype).requires_grad_(False).eval()
    averages = {name: EMA(net, decay=config.ema_decay) for name, net in trained.items()} if config.ema_decay else {}

    parameters = [p for net in trained.values() for p in net.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, num_workers=config.num_workers, drop_last=True,
        # The shapes dataset's items are already independent random draws; a folder is shuffled.
        shuffle=not isinstance(dataset, ShapesDataset),
    )
    prepared = accelerator.prepare(*forward_modules.values(), optimizer, loader)
    models = dict(zip(forward_modules, prepared[: len(trained)]))
    optimizer, loader = prepared[len(trained):]
    for average in averages.values():
        average.to(device)
        accelerator.register_for_checkpointing(average)
    randomness = _Randomness(device, config.seed * 1000 + accelerator.process_index)
    accelerator.register_for_checkpointing(randomness)
    generator = randomness.generator

    step = 0
    if resume is not None:
        checkpoint = _resolve_resume(resume, checkpoint_dir)
        accelerator.load_state(str(checkpoint / STATE_FOLDER))
        step = json.loads((checkpoint / STATE_FOLDER / PROGRESS_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", checkpoint, step)

    alphas_cumprod = alphas_cumprod_from_config(pipe.scheduler).to(device)
    text_length = pipe.text_encoder.config.max_position_embeddings
    scaling_factor = pipe.vae.config.scaling_factor

    def loss_of(batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixels"].to(device)
        if stage == "vae":
            reconstruction, mean, logvar = models["vae"](pixels, generator)
            total, l1, kl = vae_loss(pixels, reconstruction, DiagonalGaussian(mean, logvar), kl_weight=config.kl_weight)
            return total, {"l1": l1.item(), "kl": kl.item()}
        with torch.no_grad():
            latents = pipe.vae.encode(pixels.to(frozen_dtype)).sample(generator).float() * scaling_factor
        captions = drop_captions(batch["caption"], config.caption_dropout, generator=generator)
        input_ids = tokenize(pipe.tokenizer, captions, length=text_length).to(device)
        text_encoder = models.get("text_encoder", pipe.text_encoder)
        with torch.set_grad_enabled(config.train_text_encoder):
            context = text_encoder(input_ids)
        t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), device=device, generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        loss = diffusion_loss(
            models["unet"], latents, context.float(), t=t, noise=noise,
            alphas_cumprod=alphas_cumprod, prediction_type=pipe.scheduler.prediction_type,
        )
        return loss, {}

    def averaged_pipe() -> StableDiffusion:
        if averages:
            return _snapshot(pipe, {name: average.averaged for name, average in averages.items()})
        return _snapshot(pipe, trained)

    def save_checkpoint() -> None:
        folder = checkpoint_dir / f"step-{step:07d}"
        accelerator.save_state(str(folder / STATE_FOLDER))
        if accelerator.is_main_process:
            hub.save(averaged_pipe(), folder)
            (folder / STATE_FOLDER / PROGRESS_FILE).write_text(json.dumps({"step": step, "stage": stage}))
            for old in _checkpoints(checkpoint_dir)[: -config.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    # Resuming: the batches already seen are skipped (exactly for the shapes stream, whose items
    # are fixed by their index; for a folder, within the epoch).
    batches_done = step * config.gradient_accumulation_steps
    epoch_batches = accelerator.skip_first_batches(loader, batches_done % len(loader)) if batches_done else loader
    bar = tqdm(total=config.steps, initial=step, desc=stage, disable=not accelerator.is_local_main_process)
    running_loss = None
    while step < config.steps:
        for batch in epoch_batches:
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate_at(step)
            with accelerator.accumulate(*models.values()):
                with accelerator.autocast():
                    loss, extras = loss_of(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            for name, average in averages.items():
                average.update(trained[name])
            running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running_loss:.4f}", lr=f"{config.learning_rate_at(step):.1e}", **{k: f"{v:.4f}" for k, v in extras.items()})
            if step % config.log_every == 0:
                logger.info("%s step %d/%d loss %.5f (smoothed %.5f) %s", stage, step, config.steps, loss.item(), running_loss, extras)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint()
            if step >= config.steps:
                break
        epoch_batches = loader
    bar.close()

    result = averaged_pipe()
    if stage == "vae":
        factor = estimate_scaling_factor(result.vae, loader, batches=16, device=device)
        result.vae.config = dataclasses.replace(result.vae.config, scaling_factor=factor)
        logger.info("latent scaling factor: %.5f", factor)
    if save_dtype is not None:
        result = result.to(dtype=save_dtype)
    if accelerator.is_main_process:
        hub.save(result, output)
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m stable_diffusion.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="build a fresh tiny model for the shapes dataset")
    init.add_argument("--output", required=True, type=Path)
    init.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32)")
    init.add_argument("--seed", type=int, default=0)

    for stage, help_text, lr, steps, batch in (
        ("vae", "train the autoencoder", 1e-3, 1500, 32),
        ("diffusion", "train the UNet (and text encoder) on the diffusion loss", 5e-4, 8000, 32),
    ):
        sub = commands.add_parser(stage, help=help_text)
        sub.add_argument("--model", required=True, help="the model to start from: local diffusers folder or Hub repo id")
        sub.add_argument("--data", default="shapes", help="'shapes' or a folder of images with same-name .txt captions")
        sub.add_argument("--output", required=True, type=Path, help="where the trained model is saved (diffusers layout)")
        sub.add_argument("--checkpoint-dir", type=Path, help="where step-N checkpoints go (default: OUTPUT/checkpoints)")
        sub.add_argument("--resume", help="a step-N checkpoint folder, or 'latest' in the checkpoint dir")
        sub.add_argument("--resolution", type=int, help="training image side (default: the model's native size)")
        sub.add_argument("--steps", type=int, default=steps)
        sub.add_argument("--batch-size", type=int, default=batch, help="per process, per accumulation step")
        sub.add_argument("--learning-rate", type=float, default=lr)
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
        if stage == "vae":
            sub.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
        else:
            sub.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout,
                             help="probability of training on the empty caption, for classifier-free guidance")
            sub.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "init":
            hub.save(tiny_shapes_pipeline(resolution=args.resolution, seed=args.seed), args.output)
            logger.info("saved a fresh tiny model to %s", args.output)
            return 0
        options = {
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(TrainConfig)
            if hasattr(args, field.name) and getattr(args, field.name) is not None
        }
        config = TrainConfig(**options)
        pipe = hub.load(args.model, device="cpu", dtype=torch.float32)
        resolution = config.resolution or pipe.native_size
        dataset = make_dataset(args.data, resolution=resolution, seed=config.seed)
        train(pipe, dataset, stage=args.command, config=config, output=args.output,
              checkpoint_dir=args.checkpoint_dir, resume=args.resume, save_dtype=parse_dtype(args.save_dtype))
    except (ValueError, hub.ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
