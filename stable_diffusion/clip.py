"""CLIP text encoder (Radford et al. 2021): the prompt conditioning of Stable Diffusion.

SD 1.x uses OpenAI's ViT-L/14 text tower (12 layers, quick-GELU); SD 2.x uses OpenCLIP ViT-H's
(24 layers, exact GELU), of which the Hub checkpoint keeps the first 23 because SD 2.x conditions on
the penultimate layer. Both are pre-LayerNorm causal transformers over 77 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stable_diffusion.layers import Attention

__all__ = ["CLIPTextConfig", "CLIPTextModel"]

HIDDEN_ACTS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text tower."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)

    @classmethod
    def sd21(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14 text tower, last of its 24 layers dropped as in the Hub checkpoint."""
        return cls(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=23,
            num_heads=16,
            hidden_act="gelu",
        )

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A few-hundred-kilobyte encoder for tests; the full vocabulary so the real tokenizer works."""
        return cls(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)

    @classmethod
    def from_hub_config(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """Reads transformers' ``text_encoder/config.json``."""
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            max_position_embeddings=d.get("max_position_embeddings", 77),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        )

    def to_hub_config(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``CLIPTextModel`` reads back."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
        }


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU (section 2 of Hendrycks & Gimpel 2016) OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block (Xiong et al. 2020) with causal self-attention, as in GPT-2."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(
            config.hidden_size, num_heads=config.num_heads, head_dim=config.head_dim, qkv_bias=True, causal=True
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, *, skip_last_layers: int = 0) -> torch.Tensor:
        """Token ids [B, T] -> per-token hidden states [B, T, hidden_size].

        ``skip_last_layers=k`` stops k blocks early and applies the final LayerNorm there: k=1 is the
        penultimate layer that NovelAI-style fine-tunes condition on (the web UIs' "CLIP skip 2").
        """
        if not 0 <= skip_last_layers < self.config.num_layers:
            raise ValueError(f"skip_last_layers must be in 0..{self.config.num_layers - 1}, got {skip_last_layers}")
        seq_len = input_ids.shape[-1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"at most {self.config.max_position_embeddings} tokens fit the position table, got {seq_len}"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for layer in self.layers[: self.config.num_layers - skip_last_layers]:
            x = layer(x)
        return self.final_layer_norm(x)
