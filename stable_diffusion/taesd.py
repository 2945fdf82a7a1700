"""The tiny autoencoder TAESD (Ollin Boer Bohan, https://github.com/madebyollin/taesd).

A small convolutional network distilled from Stable Diffusion's VAE (``vae.py``): about 1.2M
parameters per half instead of the VAE's 34M encoder and 49M decoder, no attention, no
normalisation, ReLU activations and one channel width throughout. It decodes a 64×64 latent into a
512×512 picture in a fraction of the VAE's time, cheap enough to show every sampling step.

Two things set it apart from the VAE, and both decide what ``encode`` and ``decode`` mean:

* It was trained on the diffusion model's *scaled* latents (the VAE's latents times 0.18215):
  the encoder predicts them directly and the decoder inverts them, so both speak the UNet's latent
  space with no scaling factor. diffusers' config for ``madebyollin/taesd`` says
  ``scaling_factor: 1.0`` for this reason, and this module implements only that case.
* Its pixels are in [0, 1]; ``encode`` and ``decode`` convert from and to the [-1, 1] that the
  rest of the package (and the VAE) uses, exactly as diffusers' ``AutoencoderTiny`` does.

The modules keep the layout of diffusers' ``AutoencoderTiny`` (``encoder.layers.N``,
``decoder.layers.N``: one ``nn.Sequential`` per half), so its checkpoints load without renames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stable_diffusion.devices import conv_memory_format
from stable_diffusion.layers import Conv2d

__all__ = ["TAESDConfig", "TinyAutoencoder"]

# Options of diffusers' AutoencoderTiny config and the values this network implements. The
# scaling and shift factors must be the identity: encode/decode promise the UNet's latent space.
_FIXED_HUB_OPTIONS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("relu",),
    "upsample_fn": ("nearest",),
    "upsampling_scaling_factor": (2,),
    "scaling_factor": (1.0,),
    "shift_factor": (0.0, None),
}
# Read and ignored: latent_magnitude / latent_shift only map latents to 8-bit image files
# (AutoencoderTiny.scale_latents), force_upcast is a hint for half-precision pipelines, and
# block_out_channels is a copy of decoder_block_out_channels that diffusers registers.


@dataclass(frozen=True)
class TAESDConfig:
    encoder_channels: int  # the one width of every encoder conv
    decoder_channels: int
    num_encoder_blocks: tuple[int, ...]  # Blocks per level; every level after the first halves the side
    num_decoder_blocks: tuple[int, ...]  # Blocks per level; every level but the last doubles the side
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4

    def __post_init__(self) -> None:
        if len(self.num_encoder_blocks) != len(self.num_decoder_blocks):
            raise ValueError(
                f"the decoder must undo the encoder's downsampling: {len(self.num_encoder_blocks)} encoder levels "
                f"but {len(self.num_decoder_blocks)} decoder levels"
            )
        if not self.num_encoder_blocks or min(self.num_encoder_blocks + self.num_decoder_blocks) < 0:
            raise ValueError("num_encoder_blocks / num_decoder_blocks need at least one level and no negative counts")

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side (8 for SD)."""
        return 2 ** (len(self.num_encoder_blocks) - 1)

    @classmethod
    def sd(cls) -> TAESDConfig:
        """``madebyollin/taesd``, the TAESD of SD 1.x and 2.x (diffusers' AutoencoderTiny defaults)."""
        return cls(
            encoder_channels=64, decoder_channels=64, num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)
        )

    @classmethod
    def tiny(cls) -> TAESDConfig:
        """Four levels like SD's (8× downsampling), 8 channels."""
        return cls(
            encoder_channels=8, decoder_channels=8, num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1)
        )

    @classmethod
    def from_hub_config(cls, d: dict[str, Any]) -> TAESDConfig:
        """Reads diffusers' AutoencoderTiny ``config.json``; missing keys take diffusers' defaults."""
        if d.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ValueError(f"this is the config of a {d['_class_name']}, not of an AutoencoderTiny")
        for key, supported in _FIXED_HUB_OPTIONS.items():
            if d.get(key, supported[0]) not in supported:
                raise ValueError(
                    f"unsupported AutoencoderTiny config: {key}={d[key]!r} (this TAESD implements {supported[0]!r})"
                )
        halves = {}
        for half, default_blocks in (("encoder", (1, 3, 3, 3)), ("decoder", (3, 3, 3, 1))):
            num_blocks = tuple(d.get(f"num_{half}_blocks", default_blocks))
            channels = list(d.get(f"{half}_block_out_channels", [64] * len(num_blocks)))
            # diffusers' EncoderTiny/DecoderTiny give every conv of a level its own width as both
            # input and output, so only lists of one width describe a network that runs.
            if len(channels) != len(num_blocks) or len(set(channels)) != 1:
                raise ValueError(
                    f"{half}_block_out_channels must repeat one width once per level of num_{half}_blocks "
                    f"{list(num_blocks)}, got {channels}"
                )
            halves[half] = (channels[0], num_blocks)
        return cls(
            encoder_channels=halves["encoder"][0],
            decoder_channels=halves["decoder"][0],
            num_encoder_blocks=halves["encoder"][1],
            num_decoder_blocks=halves["decoder"][1],
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
        )

    def to_hub_config(self) -> dict[str, Any]:
        """A ``config.json`` that diffusers' ``AutoencoderTiny`` reads back."""
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "encoder_block_out_channels": [self.encoder_channels] * len(self.num_encoder_blocks),
            "decoder_block_out_channels": [self.decoder_channels] * len(self.num_decoder_blocks),
            "num_encoder_blocks": list(self.num_encoder_blocks),
            "num_decoder_blocks": list(self.num_decoder_blocks),
            **{key: supported[0] for key, supported in _FIXED_HUB_OPTIONS.items()},
        }


def _conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, bias: bool = True) -> Conv2d:
    return Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """TAESD's residual unit: three 3×3 convs with ReLUs between them, a skip connection, a ReLU.

    ``conv`` is a Sequential so the convs sit at the checkpoints' indices 0, 2 and 4. The original
    Block also has a 1×1 ``skip`` conv for a change of width, which never happens in TAESD.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        convs = [_conv3x3(channels, channels) for _ in range(3)]
        self.conv = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class TinyEncoder(nn.Module):
    """Pixels in [0, 1] -> latents: a conv, then per level a stride-2 conv (all but the first level)
    and that level's Blocks, then a conv to the latent channels. No posterior: the output is the latent."""

    def __init__(self, config: TAESDConfig) -> None:
        super().__init__()
        width = config.encoder_channels
        layers: list[nn.Module] = [_conv3x3(config.in_channels, width)]
        for level, num_blocks in enumerate(config.num_encoder_blocks):
            if level > 0:
                layers.append(_conv3x3(width, width, stride=2, bias=False))  # a learned downsampling
            layers.extend(Block(width) for _ in range(num_blocks))
        layers.append(_conv3x3(width, config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class TinyDecoder(nn.Module):
    """Latents -> pixels in about [0, 1]: a soft clamp, a conv and ReLU, then per level that level's
    Blocks and (all but the last level) a nearest-neighbour ×2 upsampling and a bias-free conv; the
    last level ends in a conv to RGB."""

    def __init__(self, config: TAESDConfig) -> None:
        super().__init__()
        width = config.decoder_channels
        layers: list[nn.Module] = [_conv3x3(config.latent_channels, width), nn.ReLU()]
        last = len(config.num_decoder_blocks) - 1
        for level, num_blocks in enumerate(config.num_decoder_blocks):
            layers.extend(Block(width) for _ in range(num_blocks))
            if level < last:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv3x3(width, width, bias=False)]
        layers.append(_conv3x3(width, config.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # A smooth clamp to (-3, 3), close to the identity for |x| well below 3: latents far outside
        # the range the decoder was trained on cannot blow up the picture.
        return self.layers(torch.tanh(latents / 3) * 3)


class TinyAutoencoder(nn.Module):
    def __init__(self, config: TAESDConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8] in the UNet's (scaled) space."""
        images = images.contiguous(memory_format=conv_memory_format(images.device))  # every conv follows its input
        return self.encoder(images.add(1).div(2))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] in the UNet's space -> images [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        latents = latents.contiguous(memory_format=conv_memory_format(latents.device))  # every conv follows its input
        return self.decoder(latents).mul(2).sub(1)
