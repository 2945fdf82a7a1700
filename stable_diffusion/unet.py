"""The denoising UNet of latent diffusion (Rombach et al. 2022, section 3.3 and appendix).

A UNet (Ronneberger et al. 2015) of residual blocks with the timestep embedding added inside each
block (Ho et al. 2020), and, at the chosen resolutions, spatial transformers whose cross-attention
reads the text encoder's hidden states. The network predicts ε (or v): it knows nothing about
noise schedules or latent scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stable_diffusion.layers import Attention, Conv2d, Downsample, ResBlock, Upsample, timestep_embedding

__all__ = ["UNet", "UNetConfig"]

# Options of diffusers' UNet2DConditionModel config that SD 1.x/2.x leave at one value, which is the
# only one this UNet implements. A Hub config that sets another value is rejected, not misread.
_FIXED_HUB_OPTIONS: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
_DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCK_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]  # per down level: has spatial transformers; up levels mirror
    num_heads: tuple[int, ...]  # attention heads per level; the mid block uses the last
    cross_attention_dim: int
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = False
    transformer_layers_per_block: tuple[int, ...] | None = None  # None: one per level
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64
    upcast_attention: bool = False
    # Width of the guidance embedding that guidance-distilled UNets (LCM) add to the timestep
    # features; None for UNets that take no such input.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if self.transformer_layers_per_block is None:
            object.__setattr__(self, "transformer_layers_per_block", (1,) * levels)
        for name in ("attention_levels", "num_heads", "transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} needs one entry per level ({levels}), got {getattr(self, name)}")
        for channels, heads in zip(self.block_out_channels, self.num_heads, strict=True):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"block channels {channels} must be divisible by their num_heads ({heads}) "
                    f"and by norm_num_groups ({self.norm_num_groups})"
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_levels=(True, True, True, False),
            num_heads=(8, 8, 8, 8),
            cross_attention_dim=768,
        )

    @classmethod
    def sd21(cls) -> UNetConfig:
        """The 768-px v-prediction UNet; 2.1-base differs only in sample_size=64 and upcast_attention=False."""
        return cls(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_levels=(True, True, True, False),
            num_heads=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            sample_size=96,
            upcast_attention=True,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """Two levels, 32/64 channels; cross_attention_dim matches CLIPTextConfig.tiny()."""
        return cls(
            block_out_channels=(32, 64),
            layers_per_block=2,
            attention_levels=(True, False),
            num_heads=(2, 2),
            cross_attention_dim=32,
            norm_num_groups=8,
            sample_size=8,
        )

    @classmethod
    def from_hub_config(cls, d: dict[str, Any]) -> UNetConfig:
        """Reads diffusers' ``unet/config.json``; missing keys take diffusers' defaults."""
        for key, supported in _FIXED_HUB_OPTIONS.items():
            value = d.get(key, supported)
            if any(v != supported for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"unsupported UNet config: {key}={value!r} (this UNet implements only {supported!r})")
        down_types = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        for block_type in down_types:
            if block_type not in _DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block {block_type!r}; valid: {sorted(_DOWN_BLOCK_TYPES)}")
        attention_levels = tuple(_DOWN_BLOCK_TYPES[t] for t in down_types)
        expected_up = [_UP_BLOCK_TYPES[a] for a in reversed(attention_levels)]
        if list(d.get("up_block_types", expected_up)) != expected_up:
            raise ValueError(f"up_block_types must mirror the down blocks: {expected_up}, got {d['up_block_types']}")
        for key in ("layers_per_block", "cross_attention_dim"):
            if isinstance(d.get(key), list):
                raise ValueError(f"{key} must be a single int for this UNet, got {d[key]}")

        levels = len(attention_levels)
        # The quirk: in SD 1.x/2.x configs `attention_head_dim` holds the number of heads per level
        # (8, or [5, 10, 20, 20]), not their width; diffusers reads it that way when
        # `num_attention_heads` is unset. A config that does set `num_attention_heads` means it.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        transformer_layers = d.get("transformer_layers_per_block", 1)
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
            layers_per_block=d.get("layers_per_block", 2),
            attention_levels=attention_levels,
            num_heads=tuple(heads) if isinstance(heads, list) else (heads,) * levels,
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            use_linear_projection=d.get("use_linear_projection", False),
            transformer_layers_per_block=(
                tuple(transformer_layers) if isinstance(transformer_layers, list) else (transformer_layers,) * levels
            ),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            sample_size=d.get("sample_size") or 64,
            upcast_attention=d.get("upcast_attention", False),
            time_cond_proj_dim=d.get("time_cond_proj_dim"),
        )

    def to_hub_config(self) -> dict[str, Any]:
        """A ``config.json`` that diffusers' ``UNet2DConditionModel`` reads back."""
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": [
                "CrossAttnDownBlock2D" if has_attention else "DownBlock2D" for has_attention in self.attention_levels
            ],
            "up_block_types": [_UP_BLOCK_TYPES[a] for a in reversed(self.attention_levels)],
            # Head counts go in `attention_head_dim` (see from_hub_config): diffusers refuses
            # `num_attention_heads` for this model class.
            "attention_head_dim": list(self.num_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "sample_size": self.sample_size,
            "upcast_attention": self.upcast_attention,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features (Ho et al. 2020, appendix B).

    With ``cond_dim``, an extra condition (LCM's guidance embedding) is projected to the features'
    width and added to them before the MLP, as in the checkpoints (``cond_proj``, no bias).
    """

    def __init__(self, in_dim: int, out_dim: int, *, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cond_proj = None if cond_dim is None else nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_proj is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    """GEGLU feed-forward (eq. 6 of Shazeer 2020): value ⊙ GELU(gate), with a 4× inner width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner_dim = 4 * dim
        self.proj_in = nn.Linear(dim, 2 * inner_dim)
        self.proj_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; pre-LN with residuals."""

    def __init__(self, dim: int, *, num_heads: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        heads = {"num_heads": num_heads, "head_dim": dim // num_heads, "upcast": upcast}
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, **heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, **heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H·W positions of a feature map (Rombach et al. 2022, fig. 3)."""

    def __init__(self, channels: int, *, num_heads: int, num_layers: int, config: UNetConfig) -> None:
        super().__init__()
        self.use_linear_projection = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        # SD 1.x projects with 1×1 convs, SD 2.x with Linear layers: the same map, different weight shapes.
        if self.use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in = Conv2d(channels, channels, kernel_size=1)
            self.proj_out = Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                channels,
                num_heads=num_heads,
                context_dim=config.cross_attention_dim,
                upcast=config.upcast_attention,
            )
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        # [B, C, H, W] -> [B, H*W, C]
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        # [B, H*W, C] -> [B, C, H, W]
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h


def _res_block(in_channels: int, out_channels: int, config: UNetConfig) -> ResBlock:
    return ResBlock(
        in_channels,
        out_channels,
        time_emb_dim=config.time_embed_dim,
        num_groups=config.norm_num_groups,
        eps=config.norm_eps,
    )


def _transformers(channels: int, count: int, *, level: int, config: UNetConfig) -> nn.ModuleList | None:
    """The spatial transformers of a level, one after each of its ResBlocks (None: a level without attention)."""
    if not config.attention_levels[level]:
        return None
    return nn.ModuleList(
        SpatialTransformer(
            channels, num_heads=config.num_heads[level], num_layers=config.transformer_layers_per_block[level], config=config
        )
        for _ in range(count)
    )


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, level: int, config: UNetConfig) -> None:
        super().__init__()
        layers = config.layers_per_block
        self.resnets = nn.ModuleList(
            _res_block(in_channels if i == 0 else out_channels, out_channels, config) for i in range(layers)
        )
        self.attentions = _transformers(out_channels, layers, level=level, config=config)
        is_last = level == len(config.block_out_channels) - 1
        self.downsample = None if is_last else Downsample(out_channels)

    def forward(
        self, x: torch.Tensor, time_emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the skip connections (every layer's output, then the downsampled one)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_res_block(channels, channels, config) for _ in range(2))
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    channels,
                    num_heads=config.num_heads[-1],
                    num_layers=config.transformer_layers_per_block[-1],
                    config=config,
                )
            ]
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, time_emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, time_emb)


class UpBlock(nn.Module):
    """Mirror of a DownBlock, with one more layer: it also consumes the skip saved before downsampling."""

    def __init__(self, *, level: int, config: UNetConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        out_channels = channels[level]
        below_channels = channels[min(level + 1, len(channels) - 1)]  # channels arriving from the level below
        skip_in_channels = channels[max(level - 1, 0)]  # channels of the skip saved before this level's down path
        layers = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            _res_block(
                (below_channels if i == 0 else out_channels) + (skip_in_channels if i == layers - 1 else out_channels),
                out_channels,
                config,
            )
            for i in range(layers)
        )
        self.attentions = _transformers(out_channels, layers, level=level, config=config)
        self.upsample = None if level == 0 else Upsample(out_channels)

    def forward(
        self,
        x: torch.Tensor,
        time_emb: torch.Tensor,
        context: torch.Tensor,
        *,
        skips: list[torch.Tensor],
        upsample_size: torch.Size | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), time_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsample is not None:
            x = self.upsample(x, size=upsample_size)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimeEmbedding(channels[0], config.time_embed_dim, cond_dim=config.time_cond_proj_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(level - 1, 0)], channels[level], level=level, config=config)
            for level in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], config)
        self.up_blocks = nn.ModuleList(UpBlock(level=level, config=config) for level in reversed(range(len(channels))))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        *,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noisy latents x [B, C, h, w], timestep(s) t, text states [B, T, D] -> ε (or v) [B, C, h, w].

        t may be a Python int/float, a 0-dim tensor, or one value per batch element; fractional
        values are fine (Karras-σ samplers land between the trained integer steps).
        ``timestep_cond`` [1 or B, time_cond_proj_dim] is the guidance embedding of a UNet built
        with ``time_cond_proj_dim`` (``layers.guidance_scale_embedding``), and only of such a UNet.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"t must be a scalar or have one value per batch element ({x.shape[0]}), got shape {tuple(t.shape)}"
            )
        t = t.reshape(-1).expand(x.shape[0])
        time_features = timestep_embedding(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        dtype = self.time_embedding.linear_1.weight.dtype
        time_emb = self.time_embedding(time_features.to(dtype), self._checked_cond(timestep_cond, x.shape[0], dtype))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, time_emb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, time_emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, so latents whose side is not a multiple of 2**levels still fit.
            h = block(h, time_emb, context, skips=block_skips, upsample_size=skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _checked_cond(self, timestep_cond: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        dim = self.config.time_cond_proj_dim
        if dim is None:
            if timestep_cond is not None:
                raise ValueError("timestep_cond was given, but this UNet has no time_cond_proj_dim to take it.")
            return None
        if timestep_cond is None:
            raise ValueError(
                f"this UNet was distilled with a guidance embedding (time_cond_proj_dim={dim}): pass "
                f"timestep_cond=layers.guidance_scale_embedding(w, {dim})."
            )
        if timestep_cond.shape not in ((1, dim), (batch, dim)):
            raise ValueError(f"timestep_cond must have shape [1 or {batch}, {dim}], got {tuple(timestep_cond.shape)}")
        return timestep_cond.to(dtype)
