"""Building blocks shared by the text encoder, the UNet and the VAE.

One implementation of each: the convolution, multi-head attention, the residual block, the 2× down/up
samplers and the sinusoidal timestep (and guidance) embedding. Module and parameter names follow the
Hub checkpoints (``to_q``, ``time_emb_proj``, ``conv_shortcut``, ...) so the weight map stays a short
list of renames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from stable_diffusion import cpu_conv

__all__ = [
    "Attention",
    "AttentionProbe",
    "Conv2d",
    "Downsample",
    "ResBlock",
    "Upsample",
    "attention_probe",
    "guidance_scale_embedding",
    "timestep_embedding",
]

AttentionProbe = Callable[["Attention", torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``probe(module, q, k, v)``: sees a cross-attention layer's queries, keys and values ``[B, heads, N, head_dim]``."""

# The probe of the current thread (or asyncio task), set only by ``attention_probe``: a context
# variable rather than module state or forward hooks, so that a capturing run never sees, or
# slows, the attention layers of a concurrent run that does not capture.
_ATTENTION_PROBE: ContextVar[AttentionProbe | None] = ContextVar("attention_probe", default=None)


@contextmanager
def attention_probe(probe: AttentionProbe) -> Iterator[None]:
    """Call ``probe(module, q, k, v)`` in every cross-attention layer that runs in this context.

    For observers that need the attention probabilities softmax(q·kᵀ/√d), which the fused SDPA
    kernel never materialises (``inside.AttentionCapture``). The attention's output is unchanged.
    """
    token = _ATTENTION_PROBE.set(probe)
    try:
        yield
    finally:
        _ATTENTION_PROBE.reset(token)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same checkpoint names) whose CPU inference runs the algorithm
    measured fastest for its shape on this machine (``cpu_conv``); elsewhere it is ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return cpu_conv.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (eq. 1 of Vaswani et al. 2017) over token sequences.

    Self-attention when ``context`` is None, cross-attention on ``context`` otherwise. The four
    projections are separate Linear layers, as in the checkpoints.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        causal: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.Linear(inner_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        probe = None if context is None else _ATTENTION_PROBE.get()
        context = x if context is None else context
        batch = x.shape[0]
        # [B, N, H*D] -> [B, H, N, D]
        q, k, v = (
            proj(source).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
            for proj, source in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out_dtype = q.dtype
        if self.upcast and out_dtype in (torch.float16, torch.bfloat16):
            # SD 2.x's 768-px UNet was trained with attention in float32; its half-precision
            # logits q·kᵀ can overflow, which shows up as NaN/black images.
            q, k, v = q.float(), k.float(), v.float()
        if probe is not None:
            probe(self, q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).to(out_dtype)
        # [B, H, N, D] -> [B, N, H*D]
        out = out.transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim)
        return self.to_out(out)


class ResBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016) as used by DDPM (Ho et al. 2020, appendix B).

    The timestep embedding, when given, is projected to a per-channel bias between the two convs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        time_emb_dim: int | None = None,
        num_groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = None if time_emb_dim is None else nn.Linear(time_emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            None if in_channels == out_channels else Conv2d(in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if time_emb is None:
                raise ValueError("this ResBlock was built with time_emb_dim, so forward needs time_emb")
            h = h + self.time_emb_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Halves the resolution with a stride-2 3×3 conv."""

    def __init__(self, channels: int, *, asymmetric_padding: bool = False) -> None:
        super().__init__()
        # The LDM VAE pads only right and bottom (its conv has padding 0); the UNet pads 1 on every side.
        # Both are kept because the trained weights expect their own alignment.
        self.asymmetric_padding = asymmetric_padding
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles the resolution (nearest neighbour), then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, *, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        # `size` lets the UNet match an odd-sized skip connection (a latent side that is not a multiple
        # of 2**levels); for even sizes it equals the ×2 scale factor.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim] float32.

    Frequencies as in section 3.5 of Vaswani et al. 2017, applied to the diffusion step as in DDPM
    (Ho et al. 2020): ω_i = 10000^(-i / (dim/2 - freq_shift)). Fractional t (from Karras-σ samplers)
    interpolates smoothly between the integer steps the network was trained on.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor [N], got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    return _sinusoidal(t.float(), torch.exp(exponent), dim, cos_first=flip_sin_to_cos)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights w, [N] -> [N, dim] float32: [sin(1000·w·ω_i), cos(1000·w·ω_i)].

    The extra input of guidance-distilled UNets (LCM, Luo et al. 2023, §4.2, after Meng et al.
    2023), fed through the UNet's ``time_cond_proj``. It is the timestep embedding of 1000·w with
    ω_i = 10000^(-i / (dim/2 - 1)), sine first; the frequencies are rounded as in the LCM training
    code (float32 log 10000, divided, then multiplied by i), so the network sees exactly its
    training inputs. diffusers' LCM pipeline passes w = guidance_scale - 1 (their CFG scale is
    the paper's ω + 1).
    """
    if w.ndim != 1:
        raise ValueError(f"guidance weights must be a 1-D tensor [N], got shape {tuple(w.shape)}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    return _sinusoidal(w.float() * 1000.0, frequencies, dim, cos_first=False)


def _sinusoidal(values: torch.Tensor, frequencies: torch.Tensor, dim: int, *, cos_first: bool) -> torch.Tensor:
    """[N] values times [dim // 2] frequencies -> [N, dim] sines and cosines (zero-padded to odd ``dim``)."""
    angles = values[:, None] * frequencies[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if cos_first else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
