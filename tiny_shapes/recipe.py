"""The recipe of the bundled tiny model: its architecture, and how it is trained on the shapes.

``tiny_shapes_pipeline`` builds the fresh, randomly initialised model that ``python -m tiny_shapes
init`` saves; ``train_config`` is the core ``TrainConfig`` with what the shapes stream needs.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.pipelines import StableDiffusion
from stable_diffusion.schedules import SchedulerConfig
from stable_diffusion.train import TrainConfig
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import AutoencoderKL, VAEConfig

from .dataset import all_combinations
from .tokenizer import learn_bpe_tokenizer

__all__ = ["tiny_shapes_pipeline", "train_config"]


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


def train_config(**options: Any) -> TrainConfig:
    """The ``TrainConfig`` of ``options`` for training on ``ShapesDataset``: read in order, not shuffled.

    Its items are already independent random draws (item i is seeded by i), so shuffling adds
    nothing; and in order, a run resumed at batch n replays exactly the batches the uninterrupted
    run would have drawn (the 10-million-item stream is never exhausted, so resuming never falls
    back to "within the epoch" as for a folder).
    """
    return TrainConfig(**options, shuffle=False)
