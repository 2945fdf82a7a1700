"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, section 3.1 and appendix G).

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents 8× smaller per side; the
decoder maps latents back. The latent scaling factor (unit variance for the diffusion model) is a
config value applied by the pipeline, never inside encode/decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stable_diffusion.devices import conv_memory_format
from stable_diffusion.layers import Attention, Conv2d, Downsample, ResBlock, Upsample

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig"]

# Options of diffusers' AutoencoderKL config with the one value this VAE implements (see unet.py).
_FIXED_HUB_OPTIONS: dict[str, Any] = {
    "act_fn": "silu",
    "down_block_types": "DownEncoderBlock2D",
    "up_block_types": "UpDecoderBlock2D",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}
_EPS = 1e-6  # every GroupNorm of the VAE


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215  # latents are multiplied by this before diffusion (section 4.3.2)

    def __post_init__(self) -> None:
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"block channels {channels} must be divisible by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2)

    @classmethod
    def sd21(cls) -> VAEConfig:
        """The same network as SD 1.x's (its weights were fine-tuned further), configured for 768 px."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768)

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Four levels like SD (8× downsampling), 16/32 channels."""
        return cls(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)

    @classmethod
    def from_hub_config(cls, d: dict[str, Any]) -> VAEConfig:
        """Reads diffusers' ``vae/config.json``; missing keys take diffusers' defaults."""
        for key, supported in _FIXED_HUB_OPTIONS.items():
            value = d.get(key, supported)
            if any(v != supported for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"unsupported VAE config: {key}={value!r} (this VAE implements only {supported!r})")
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", (64,))),
            layers_per_block=d.get("layers_per_block", 1),
            norm_num_groups=d.get("norm_num_groups", 32),
            sample_size=d.get("sample_size", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
        )

    def to_hub_config(self) -> dict[str, Any]:
        """A ``config.json`` that diffusers' ``AutoencoderKL`` reads back."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
        }


@dataclass(frozen=True, eq=False)
class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)) (Kingma & Welling 2014, section 2.4)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        # The clamp keeps exp() finite for untrained or fp16 weights; the original LDM code does the same.
        return cls(mean=mean, logvar=logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std·ε. The noise is drawn on the generator's device and then
        moved, as diffusers does, so a CPU generator gives the same latents on any accelerator."""
        noise_device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class SelfAttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a GroupNorm and a residual."""

    def __init__(self, channels: int, *, num_groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(num_groups, channels, eps=_EPS)
        self.attn = Attention(channels, num_heads=1, head_dim=channels, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # [B, C, H, W] -> [B, H*W, C]
        h = self.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)
        h = self.attn(h)
        # [B, H*W, C] -> [B, C, H, W]
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        groups = config.norm_num_groups
        self.resnets = nn.ModuleList(ResBlock(channels, channels, num_groups=groups, eps=_EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttentionBlock(channels, num_groups=groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, downsample: bool, config: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, num_groups=config.norm_num_groups, eps=_EPS)
            for i in range(num_layers)
        )
        self.downsample = Downsample(out_channels, asymmetric_padding=True) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, upsample: bool, config: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, num_groups=config.norm_num_groups, eps=_EPS)
            for i in range(num_layers)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(
                channels[max(level - 1, 0)],
                channels[level],
                num_layers=config.layers_per_block,
                downsample=level < len(channels) - 1,
                config=config,
            )
            for level in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=_EPS)
        # Twice the latent channels: mean and log-variance.
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        self.conv_in = Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], config)
        # One more layer per block than the encoder, as in the LDM decoder.
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                channels[max(i - 1, 0)],
                channels[i],
                num_layers=config.layers_per_block + 1,
                upsample=i < len(channels) - 1,
                config=config,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=_EPS)
        self.conv_out = Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = Conv2d(moments, moments, kernel_size=1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        images = images.contiguous(memory_format=conv_memory_format(images.device))  # every conv follows its input
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        latents = latents.contiguous(memory_format=conv_memory_format(latents.device))  # every conv follows its input
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through a posterior sample, as in training."""
        return self.decode(self.encode(images).sample(generator))
