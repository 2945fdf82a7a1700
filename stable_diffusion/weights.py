"""Hub-layout (diffusers / transformers) tensor names <-> ours, and one strict loader.

The networks keep the checkpoints' granularity and leaf names, so each map is a short table of
renames of dotted name fragments, read in both directions, plus an explicit list of source tensors
that carry no weights. The loader checks a state dict against a model and reports every missing,
unexpected and mis-shaped tensor at once, then assigns the tensors in place (no copy when dtype and
device already match), which also fills a model built on the meta device.

The LDM single-file layout is mapped to this Hub layout elsewhere (``single_file.py``); the
original TAESD files, whose only difference is an index shift, here (``taesd_original_to_hub``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "WEIGHT_MAPS",
    "WeightMap",
    "WeightsMismatchError",
    "build_on_meta",
    "hub_to_ours",
    "load_into",
    "ours_to_hub",
    "taesd_original_to_hub",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightMap:
    """How one network's Hub tensor names become ours.

    renames: (hub fragment, our fragment) pairs of whole dotted segments, applied in order from
        hub to ours and in reverse order from ours to hub, so they must be one-to-one.
    hub_prefix: a prefix some Hub layouts put on every name; accepted with or without, emitted when saving.
    skip: Hub names (without the prefix) that hold no weights and are dropped.
    deprecated: (old hub fragment, our fragment) pairs read but never written.
    """

    renames: tuple[tuple[str, str], ...] = ()
    hub_prefix: str = ""
    skip: frozenset[str] = frozenset()
    deprecated: tuple[tuple[str, str], ...] = ()


_VAE_ATTENTION = "attentions.0"  # the single self-attention of each VAE mid block

WEIGHT_MAPS: dict[str, WeightMap] = {
    "clip": WeightMap(
        renames=(
            ("embeddings.token_embedding", "token_embedding"),
            ("embeddings.position_embedding", "position_embedding"),
            ("encoder.layers", "layers"),
            ("self_attn.q_proj", "self_attn.to_q"),
            ("self_attn.k_proj", "self_attn.to_k"),
            ("self_attn.v_proj", "self_attn.to_v"),
            ("self_attn.out_proj", "self_attn.to_out"),
        ),
        # transformers < 5 nest the text tower under `text_model.` (every SD repo on the Hub);
        # transformers 5 saves CLIPTextModel without it.
        hub_prefix="text_model.",
        # A copy of arange(77) that older transformers saved; our model computes it in forward.
        skip=frozenset({"embeddings.position_ids"}),
    ),
    "unet": WeightMap(
        renames=(
            ("to_out.0", "to_out"),  # diffusers keeps a Dropout at to_out.1
            ("ff.net.0.proj", "ff.proj_in"),
            ("ff.net.2", "ff.proj_out"),
            ("downsamplers.0", "downsample"),
            ("upsamplers.0", "upsample"),
        ),
    ),
    "vae": WeightMap(
        renames=(
            ("downsamplers.0", "downsample"),
            ("upsamplers.0", "upsample"),
            (f"{_VAE_ATTENTION}.to_q", f"{_VAE_ATTENTION}.attn.to_q"),
            (f"{_VAE_ATTENTION}.to_k", f"{_VAE_ATTENTION}.attn.to_k"),
            (f"{_VAE_ATTENTION}.to_v", f"{_VAE_ATTENTION}.attn.to_v"),
            (f"{_VAE_ATTENTION}.to_out.0", f"{_VAE_ATTENTION}.attn.to_out"),
        ),
        # VAE uploads made with diffusers < 0.14 name the attention projections differently.
        deprecated=(
            (f"{_VAE_ATTENTION}.query", f"{_VAE_ATTENTION}.attn.to_q"),
            (f"{_VAE_ATTENTION}.key", f"{_VAE_ATTENTION}.attn.to_k"),
            (f"{_VAE_ATTENTION}.value", f"{_VAE_ATTENTION}.attn.to_v"),
            (f"{_VAE_ATTENTION}.proj_attn", f"{_VAE_ATTENTION}.attn.to_out"),
        ),
    ),
    # The tiny autoencoder keeps diffusers' AutoencoderTiny names (encoder.layers.N, decoder.layers.N).
    "taesd": WeightMap(),
}

# The original TAESD release (madebyollin/taesd's taesd_encoder / taesd_decoder .safetensors) saves
# each half as one bare nn.Sequential, named "<index>.<leaf>". The encoder's indices are diffusers';
# the decoder's Sequential opens with the parameterless soft clamp, which diffusers (and taesd.py)
# apply in forward, so its layer i + 1 is diffusers' decoder.layers.i.
_TAESD_ORIGINAL_INDEX_SHIFT = {"encoder": 0, "decoder": 1}


class WeightsMismatchError(ValueError):
    """A state dict does not fit a model; lists every missing, unexpected and mis-shaped name."""

    SHOWN = 10

    def __init__(
        self,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [
            f"weights do not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} with the wrong shape"
        ]
        shape_lines = [f"{name} {list(got)} (model wants {list(wanted)})" for name, got, wanted in mismatched]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape_lines)):
            if items:
                more = f", ... and {len(items) - self.SHOWN} more" if len(items) > self.SHOWN else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[: self.SHOWN])}{more}")
        super().__init__("\n".join(lines))


def _weight_map(network: str) -> WeightMap:
    if network not in WEIGHT_MAPS:
        raise ValueError(f"unknown network {network!r}; valid: {sorted(WEIGHT_MAPS)}")
    return WEIGHT_MAPS[network]


def _replace_fragment(name: str, old: str, new: str) -> str:
    """Replaces every run of whole dotted segments equal to `old` by `new` (so `to_out.0` never matches `to_out.01`)."""
    segments, old_segments, new_segments = name.split("."), old.split("."), new.split(".")
    out, i = [], 0
    while i < len(segments):
        if segments[i : i + len(old_segments)] == old_segments:
            out.extend(new_segments)
            i += len(old_segments)
        else:
            out.append(segments[i])
            i += 1
    return ".".join(out)


def hub_to_ours(network: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a Hub-layout state dict of ``network`` (a WEIGHT_MAPS key) to our names; tensors are not copied."""
    weight_map = _weight_map(network)
    ours: dict[str, torch.Tensor] = {}
    skipped = []
    for hub_name, tensor in state.items():
        name = hub_name.removeprefix(weight_map.hub_prefix) if weight_map.hub_prefix else hub_name
        if name in weight_map.skip:
            skipped.append(hub_name)
            continue
        for old, new in weight_map.renames + weight_map.deprecated:
            name = _replace_fragment(name, old, new)
        if name in ours:
            raise ValueError(f"two {network} tensors map to {name!r} (one of them is {hub_name!r}): mixed layouts?")
        ours[name] = tensor
    if skipped:
        logger.debug("skipped %d %s tensors without weights: %s", len(skipped), network, skipped)
    return ours


def ours_to_hub(network: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of hub_to_ours, for saving in the diffusers layout (CLIP names get ``text_model.``)."""
    weight_map = _weight_map(network)
    hub: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for old, new in reversed(weight_map.renames):
            name = _replace_fragment(name, new, old)
        hub[weight_map.hub_prefix + name] = tensor
    return hub


def taesd_original_to_hub(halves: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The original TAESD files' tensors, ``{"encoder": ..., "decoder": ...}``, under diffusers' names.

    Raises ValueError for a name that is not "<index>.<leaf>" (not an original TAESD file).
    """
    hub: dict[str, torch.Tensor] = {}
    for half, state in halves.items():
        shift = _TAESD_ORIGINAL_INDEX_SHIFT[half]
        for name, tensor in state.items():
            index, _, leaf = name.partition(".")
            if not index.isdigit() or not leaf:
                raise ValueError(f"{name!r} is not a tensor of the original TAESD {half} (expected '<index>.<name>')")
            hub[f"{half}.layers.{int(index) - shift}.{leaf}"] = tensor
    return hub


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Fills every parameter of ``model`` from ``state`` (our names: see hub_to_ours), strictly.

    Raises WeightsMismatchError unless the names match one-to-one with equal shapes. Floating-point
    tensors are converted once to ``dtype`` and all to ``device`` (None: keep theirs), then assigned
    as the model's parameters, so a model built with ``build_on_meta`` ends up fully materialised.
    Returns ``model``.
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        (name, tuple(state[name].shape), tuple(expected[name].shape))
        for name in expected.keys() & state.keys()
        if state[name].shape != expected[name].shape
    )
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(missing=missing, unexpected=unexpected, mismatched=mismatched)
    converted = {
        name: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        for name, tensor in state.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    return model


ConfigT = TypeVar("ConfigT")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


class _SkipInitialisers(TorchFunctionMode):
    """Turns the ``torch.nn.init`` functions that modules call in ``__init__`` into no-ops.

    On the meta device they compute nothing anyway, but the first ``normal_`` there (nn.Embedding's
    initialiser) goes through torch's Python reference kernels, which import torch._dynamo: about
    1.5 s of a model load spent on initialising weights that are about to be replaced.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # every initialiser returns its `tensor`
        return func(*args, **(kwargs or {}))


def build_on_meta(cls: Callable[[ConfigT], ModuleT], config: ConfigT) -> ModuleT:
    """Builds ``cls(config)`` without allocating or initialising weights; fill it with load_into."""
    with torch.device("meta"), _SkipInitialisers():
        return cls(config)
