"""Single-file checkpoints in the original LDM layout -> the Hub (diffusers / transformers) layout.

The latent diffusion training code (Rombach et al. 2022; github.com/CompVis/stable-diffusion for
SD 1.x, github.com/Stability-AI/stablediffusion for 2.x) saves its whole ``LatentDiffusion``
module as one state dict:

    model.diffusion_model.*          the UNet (``openaimodel.UNetModel``)
    first_stage_model.*              the VAE (``autoencoder.AutoencoderKL``)
    cond_stage_model.transformer.*   SD 1.x text encoder: transformers' CLIPTextModel, its names inside
    cond_stage_model.model.*         SD 2.x text encoder: an OpenCLIP ViT-H/14 text tower, OpenCLIP's names

plus the DDPM schedule as buffers and EMA bookkeeping. Stability's later training code
(github.com/Stability-AI/generative-models, "sgm") saved SD-Turbo, an SD 2.1 distilled for 1-4
steps (Sauer et al. 2023), with the same UNet and VAE names but the text encoder elsewhere:

    conditioner.embedders.0.model.*  the OpenCLIP text tower, OpenCLIP's names (sgm's GeneralConditioner)
    denoiser.sigmas                  the training σ's, a buffer of sgm's DiscreteDenoiser

SDXL files share that layout (``conditioner.embedders.*``); they are told apart and refused, see
``_refuse_sdxl``.

The map to the Hub layout is a list of prefix rules generated from the architecture, which is read
off the tensor names (levels, resnets per level, which levels attend), so fine-tunes of other
widths and depths map too. Inside a block the names are either identical (the UNet's spatial
transformers) or renamed by a short suffix table.

Two tensor transforms are unavoidable (``Rule.transform``):

* ``conv1x1``: the VAE mid-block attention projections q, k, v, proj_out are 1×1 convolutions
  [C, C, 1, 1] in LDM and linear layers [C, C] in the Hub layout;
* ``fused_qkv``: OpenCLIP keeps its attention in-projection fused, q, k, v stacked on dim 0
  (``in_proj_weight`` [3C, C], ``in_proj_bias`` [3C]); the Hub layout has three projections.

Tensors skipped on purpose are listed in ``SKIPPED`` (and OpenCLIP's last block, see
``clip_rules``). Whether a checkpoint predicts ε or v, and which scheduler config it was
released with, cannot be read from its tensors: see ``hub_configs``. (The inverse map, Hub
layout -> single file, is a test helper: tests/ldm_export.py.)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .schedules import check_prediction_type

__all__ = [
    "NETWORKS",
    "SKIPPED",
    "LDMLayoutError",
    "Rule",
    "hub_configs",
    "ldm_to_hub",
    "read_sidecar",
]

logger = logging.getLogger(__name__)

NETWORKS = ("unet", "vae", "clip")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: ldm.modules.encoders.modules.FrozenCLIPEmbedder
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: FrozenOpenCLIPEmbedder
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."  # SD-Turbo: sgm's FrozenOpenCLIPEmbedder

# The LDM parameterizations (``model.params.parameterization`` of its yaml) in diffusers' words.
_LDM_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}
_SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
# _CONFIGS holds the SD 1.5 / 2.1 / 2.1-base Hub configs and SD-Turbo's scheduler config. SD-Turbo's
# networks are SD 2.1's and make 512-px images: they start from 2.1-base's configs (its own Hub
# network configs could not be read here).
_CONFIGS = Path(__file__).parent / "assets" / "configs"
_NETWORK_CONFIGS = {"sd-turbo": "sd21-base"}
# sgm's yaml names the parameterization by the class that scales the UNet's input and output.
_SGM_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}

SKIPPED: tuple[tuple[str, str], ...] = (
    (
        (
            r"betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
            r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
            r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
        ),
        "the DDPM schedule LatentDiffusion keeps as buffers; it follows from the scheduler config",
    ),
    (r"model_ema\..*", "LDM's EMA copy of the UNet and its bookkeeping (decay, num_updates)"),
    (r"denoiser\.sigmas", "sgm's buffer of the training σ's (SD-Turbo); they follow from the scheduler config"),
    (r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids", "a saved arange(77)"),
    (
        r"(cond_stage_model|conditioner\.embedders\.0)\.model\.(text_projection|logit_scale)",
        "OpenCLIP's contrastive head: SD conditions on the hidden states",
    ),
)
"""Tensors of a single file that hold no network weight: (full-name regex, why)."""
_SKIPPED = re.compile("|".join(f"(?:{pattern})" for pattern, _ in SKIPPED))


class LDMLayoutError(ValueError):
    """The tensors are not (all) an SD 1.x / 2.x checkpoint in the LDM (or sgm) single-file layout."""


# ---------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """LDM tensor ``ldm + s`` is Hub tensor ``hub + suffixes[s]`` of ``network``.

    ``suffixes=None`` keeps every suffix as it is. With ``transform="fused_qkv"`` the Hub suffix is
    a template whose ``{}`` is q, k or v.
    """

    network: str
    ldm: str
    hub: str
    suffixes: Mapping[str, str] | None = None
    transform: Literal["conv1x1", "fused_qkv"] | None = None


def _params(modules: Mapping[str, str]) -> dict[str, str]:
    """Module renames, spelled out for their ``weight`` and ``bias``."""
    return {f"{old}.{p}": f"{new}.{p}" for old, new in modules.items() for p in ("weight", "bias")}


# openaimodel.ResBlock: in_layers = (GroupNorm, SiLU, conv), out_layers = (GroupNorm, SiLU, Dropout, conv).
UNET_RESNET = _params(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
)
VAE_RESNET = _params(
    {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
)
_VAE_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTENTION = _params({"norm": "group_norm"}) | {f"{a}.bias": f"{b}.bias" for a, b in _VAE_PROJECTIONS.items()}
VAE_ATTENTION_CONV = {f"{a}.weight": f"{b}.weight" for a, b in _VAE_PROJECTIONS.items()}
OPEN_CLIP_EMBEDDINGS = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",  # a bare Parameter, no `.weight`
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
OPEN_CLIP_LAYER = _params(
    {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
)
OPEN_CLIP_FUSED = {"attn.in_proj_weight": "self_attn.{}_proj.weight", "attn.in_proj_bias": "self_attn.{}_proj.bias"}


@dataclass(frozen=True)
class UNetLayout:
    levels: int
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]  # Hub order: the lowest resolution first
    mid_attention: bool


@dataclass(frozen=True)
class VAELayout:
    levels: int
    layers_per_block: int  # resnets per encoder level; the decoder has one more


@dataclass(frozen=True)
class CLIPLayout:
    prefix: str  # CLIP_PREFIX, OPEN_CLIP_PREFIX or SGM_OPEN_CLIP_PREFIX
    layers: int  # in the Hub layout; an OpenCLIP file holds one more

    @property
    def open_clip(self) -> bool:
        return self.prefix != CLIP_PREFIX


def unet_rules(layout: UNetLayout) -> list[Rule]:
    """openaimodel.UNetModel numbers its blocks in one flat sequence per path: an input block is a
    resnet (+ its transformer) or a downsampler; an output block is a resnet (+ its transformer)
    (+ the level's upsampler after its last resnet). diffusers nests them per level."""

    def rule(ldm: str, hub: str, suffixes: Mapping[str, str] | None = None) -> Rule:
        return Rule("unet", UNET_PREFIX + ldm, hub, suffixes)

    rules = [
        rule("time_embed.0.", "time_embedding.linear_1."),
        rule("time_embed.2.", "time_embedding.linear_2."),
        rule("input_blocks.0.0.", "conv_in."),
        rule("out.0.", "conv_norm_out."),
        rule("out.2.", "conv_out."),
    ]
    block = 1
    for level in range(layout.levels):
        for i in range(layout.layers_per_block):
            rules.append(rule(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{i}.", UNET_RESNET))
            if layout.down_attention[level]:
                rules.append(rule(f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{i}."))
            block += 1
        if level < layout.levels - 1:
            rules.append(rule(f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            block += 1
    middle = ["resnets.0", "attentions.0", "resnets.1"] if layout.mid_attention else ["resnets.0", "resnets.1"]
    for index, part in enumerate(middle):
        rules.append(rule(f"middle_block.{index}.", f"mid_block.{part}.", UNET_RESNET if "resnets" in part else None))
    block = 0
    for level in range(layout.levels):
        for i in range(layout.layers_per_block + 1):
            rules.append(rule(f"output_blocks.{block}.0.", f"up_blocks.{level}.resnets.{i}.", UNET_RESNET))
            upsampler = 1
            if layout.up_attention[level]:
                rules.append(rule(f"output_blocks.{block}.1.", f"up_blocks.{level}.attentions.{i}."))
                upsampler = 2
            if i == layout.layers_per_block and level < layout.levels - 1:
                rules.append(rule(f"output_blocks.{block}.{upsampler}.conv.", f"up_blocks.{level}.upsamplers.0.conv."))
            block += 1
    return rules


def vae_rules(layout: VAELayout) -> list[Rule]:
    def rule(ldm: str, hub: str, suffixes: Mapping[str, str] | None = None, transform: Any = None) -> Rule:
        return Rule("vae", VAE_PREFIX + ldm, hub, suffixes, transform)

    rules = [rule("quant_conv.", "quant_conv."), rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [
            rule(f"{part}.conv_in.", f"{part}.conv_in."),
            rule(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
            rule(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
            rule(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION_CONV, "conv1x1"),
            rule(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET),
            rule(f"{part}.norm_out.", f"{part}.conv_norm_out."),
            rule(f"{part}.conv_out.", f"{part}.conv_out."),
        ]
    for level in range(layout.levels):
        for i in range(layout.layers_per_block):
            rules.append(
                rule(f"encoder.down.{level}.block.{i}.", f"encoder.down_blocks.{level}.resnets.{i}.", VAE_RESNET)
            )
        if level < layout.levels - 1:
            rules.append(
                rule(f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv.")
            )
    # LDM numbers the decoder's levels by resolution like the encoder's (0 = full size); the Hub
    # numbers them in the order they run (0 = the latent size).
    for level in range(layout.levels):
        hub_level = layout.levels - 1 - level
        for i in range(layout.layers_per_block + 1):
            rules.append(
                rule(f"decoder.up.{level}.block.{i}.", f"decoder.up_blocks.{hub_level}.resnets.{i}.", VAE_RESNET)
            )
        if level > 0:
            rules.append(
                rule(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{hub_level}.upsamplers.0.conv.")
            )
    return rules


def clip_rules(layout: CLIPLayout) -> list[Rule]:
    """SD 1.x wraps transformers' CLIPTextModel, so the names match under a prefix (some files, saved
    through an older transformers, lack the ``text_model.`` level). SD 2.x conditions on the penultimate
    layer of OpenCLIP ViT-H/14, so its last resblock is never run and the Hub layout drops it:
    no rule maps it, and ``ldm_to_hub`` skips it."""
    if not layout.open_clip:
        return [Rule("clip", CLIP_PREFIX + "text_model.", "text_model."), Rule("clip", CLIP_PREFIX, "text_model.")]
    rules = [Rule("clip", layout.prefix, "text_model.", OPEN_CLIP_EMBEDDINGS)]
    for i in range(layout.layers):
        ldm, hub = f"{layout.prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        rules += [Rule("clip", ldm, hub, OPEN_CLIP_LAYER), Rule("clip", ldm, hub, OPEN_CLIP_FUSED, "fused_qkv")]
    return rules


# ------------------------------------------------------------------------------- layout detection
def _numbers(names: Iterable[str], pattern: str) -> set[int]:
    """The distinct integers captured by ``pattern`` at the start of each name."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for name in names if (m := regex.match(name))}


def _unet_layout_from_ldm(names: set[str]) -> UNetLayout:
    p = UNET_PREFIX
    levels: list[list[int]] = [[]]
    for block in sorted(_numbers(names, re.escape(p) + r"input_blocks\.(\d+)\."))[1:]:
        if f"{p}input_blocks.{block}.0.op.weight" in names:
            levels.append([])
        else:
            levels[-1].append(block)
    per_level = {len(blocks) for blocks in levels}
    if len(per_level) != 1 or 0 in per_level:
        raise LDMLayoutError(f"the UNet's input blocks do not form levels of equal depth (resnets per level: {levels})")
    layers_per_block = per_level.pop()
    return UNetLayout(
        levels=len(levels),
        layers_per_block=layers_per_block,
        down_attention=tuple(
            any(f"{p}input_blocks.{b}.1.proj_in.weight" in names for b in blocks) for blocks in levels
        ),
        up_attention=tuple(
            f"{p}output_blocks.{level * (layers_per_block + 1)}.1.proj_in.weight" in names
            for level in range(len(levels))
        ),
        mid_attention=f"{p}middle_block.1.proj_in.weight" in names,
    )


def _unet_layout_from_hub(names: set[str]) -> UNetLayout:
    levels = len(_numbers(names, r"down_blocks\.(\d+)\."))
    return UNetLayout(
        levels=levels,
        layers_per_block=len(_numbers(names, r"down_blocks\.0\.resnets\.(\d+)\.")),
        down_attention=tuple(f"down_blocks.{level}.attentions.0.proj_in.weight" in names for level in range(levels)),
        up_attention=tuple(f"up_blocks.{level}.attentions.0.proj_in.weight" in names for level in range(levels)),
        mid_attention="mid_block.attentions.0.proj_in.weight" in names,
    )


def _vae_layout_from_ldm(names: set[str]) -> VAELayout:
    p = re.escape(VAE_PREFIX)
    return VAELayout(
        levels=len(_numbers(names, p + r"encoder\.down\.(\d+)\.")),
        layers_per_block=len(_numbers(names, p + r"encoder\.down\.0\.block\.(\d+)\.")),
    )


def _vae_layout_from_hub(names: set[str]) -> VAELayout:
    return VAELayout(
        levels=len(_numbers(names, r"encoder\.down_blocks\.(\d+)\.")),
        layers_per_block=len(_numbers(names, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
    )


def _clip_layout_from_ldm(names: set[str]) -> CLIPLayout:
    for prefix in (OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX):
        if any(name.startswith(prefix) for name in names):
            blocks = _numbers(names, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
            return CLIPLayout(prefix, layers=len(blocks) - 1)
    layers = _numbers(names, re.escape(CLIP_PREFIX) + r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
    return CLIPLayout(CLIP_PREFIX, layers=len(layers))


def _ldm_rules(names: set[str]) -> tuple[list[Rule], CLIPLayout]:
    namespaces = {
        "UNet": (UNET_PREFIX,),
        "VAE": (VAE_PREFIX,),
        "text encoder": (CLIP_PREFIX, OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX),
    }
    missing = [
        f"{network} ({' or '.join(p + '*' for p in prefixes)})"
        for network, prefixes in namespaces.items()
        if not any(name.startswith(prefixes) for name in names)
    ]
    if missing:
        raise LDMLayoutError(
            f"no tensors of the {', '.join(missing)}; {_describe(names)}. An SD 1.x/2.x single file holds "
            "all three networks under these prefixes."
        )
    clip_layout = _clip_layout_from_ldm(names)
    rules = unet_rules(_unet_layout_from_ldm(names)) + vae_rules(_vae_layout_from_ldm(names)) + clip_rules(clip_layout)
    return rules, clip_layout


def _describe(names: set[str]) -> str:
    """What a set of tensor names looks like, for error messages."""
    sample = ", ".join(sorted(names)[:3])
    if any("lora" in name.lower() for name in names):
        return f"this looks like a LoRA, not a full model (names: {sample})"
    if any(name.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for name in names):
        return (
            f"this looks like one network in the Hub layout; load the whole diffusers folder instead (names: {sample})"
        )
    return f"it holds {len(names)} tensors such as {sample}"


def _refuse_sdxl(state: Mapping[str, torch.Tensor]) -> None:
    """SDXL's single files (Podell et al. 2023) use sgm's names like SD-Turbo's; what tells them apart
    is what SDXL adds: a second text encoder (CLIP ViT-L/14 beside OpenCLIP ViT-bigG/14, the
    refiner keeps only bigG), a UNet context that concatenates both (768 + 1280 = 2048 wide, so
    wider than the one text encoder an SD 2.x file has) and the pooled-text and image-size
    embedding added to the time embedding (``label_emb``, their sec. 2.2). Only names and shapes
    are read."""
    evidence = []
    if any(name.startswith(("conditioner.embedders.0.transformer.", "conditioner.embedders.1.")) for name in state):
        evidence.append("two text encoders (conditioner.embedders.0 and .1)")
    label_emb = [tuple(t.shape) for name, t in state.items() if name.startswith(f"{UNET_PREFIX}label_emb.")]
    if label_emb:
        evidence.append(f"a UNet with a size and pooled-text embedding (label_emb, {label_emb[0]})")
    text = state.get(f"{SGM_OPEN_CLIP_PREFIX}ln_final.weight")
    contexts = {
        t.shape[-1] for name, t in state.items() if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight")
    }
    if text is not None and contexts and contexts != {text.shape[0]}:
        evidence.append(f"a UNet reading {max(contexts)}-wide text states from a {text.shape[0]}-wide text encoder")
    if evidence:
        raise LDMLayoutError(
            f"this is an SDXL checkpoint ({'; '.join(evidence)}). SDXL is not supported: this package runs "
            "SD 1.x and 2.x (SD-Turbo included)"
        )


# ---------------------------------------------------------------------------------- conversions
def ldm_to_hub(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Splits an LDM single-file state dict into Hub-layout state dicts: ``{"unet": ..., "vae": ..., "clip": ...}``.

    Tensors are returned as views (no copy). Every tensor must be mapped or listed in ``SKIPPED``;
    otherwise LDMLayoutError names the ones that are not understood.
    """
    _refuse_sdxl(state)
    names = set(state)
    rules, clip_layout = _ldm_rules(names)
    unused_block = f"{clip_layout.prefix}transformer.resblocks.{clip_layout.layers}." if clip_layout.open_clip else None
    hub: dict[str, dict[str, torch.Tensor]] = {network: {} for network in NETWORKS}
    unknown = []
    for name, tensor in state.items():
        if _SKIPPED.fullmatch(name) or (unused_block and name.startswith(unused_block)):
            continue
        rule = next((r for r in rules if _ldm_suffix(r, name) is not None), None)
        if rule is None:
            unknown.append(name)
            continue
        for hub_name, value in _to_hub(rule, _ldm_suffix(rule, name), tensor):
            if hub_name in hub[rule.network]:
                raise LDMLayoutError(f"two tensors map to {rule.network} {hub_name!r} (one is {name!r})")
            hub[rule.network][hub_name] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:10])
        raise LDMLayoutError(f"{len(unknown)} tensors are not part of an SD 1.x/2.x checkpoint: {shown}")
    return hub


def _ldm_suffix(rule: Rule, name: str) -> str | None:
    if not name.startswith(rule.ldm):
        return None
    suffix = name[len(rule.ldm) :]
    return suffix if rule.suffixes is None or suffix in rule.suffixes else None


def _to_hub(rule: Rule, suffix: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    hub_suffix = suffix if rule.suffixes is None else rule.suffixes[suffix]
    if rule.transform == "fused_qkv":
        for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
            yield rule.hub + hub_suffix.format(part), chunk
    elif rule.transform == "conv1x1" and tensor.ndim == 4:
        yield rule.hub + hub_suffix, tensor.flatten(1)  # [C, C, 1, 1] -> [C, C]
    else:
        yield rule.hub + hub_suffix, tensor


# -------------------------------------------------------------------------------------- configs
def read_sidecar(checkpoint: str | Path) -> dict[str, Any] | None:
    """The config saved next to a checkpoint (same name, ``.yaml``, ``.yml`` or ``.json``), or None.

    Either the LDM training config the checkpoint came with (``v2-inference-v.yaml`` renamed, as
    the web UIs expect it) or a small mapping such as ``{"prediction_type": "v_prediction"}``.
    """
    checkpoint = Path(checkpoint)
    for suffix in _SIDECAR_SUFFIXES:
        sidecar = checkpoint.with_suffix(suffix)
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8")
            try:
                config = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as error:
                raise LDMLayoutError(f"cannot parse the sidecar config {sidecar}: {error}") from error
            if not isinstance(config, dict):
                raise LDMLayoutError(f"the sidecar config {sidecar} does not hold a mapping")
            logger.info("read the sidecar config %s", sidecar)
            return config
    return None


def hub_configs(
    state: Mapping[str, torch.Tensor],
    networks: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    prediction_type: str | None = None,
    original_config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Hub ``config.json`` dicts (``"unet"``, ``"vae"``, ``"clip"``, ``"scheduler"``, ``"tokenizer"``)
    for a single file: ``state`` is the file's state dict (its names tell the family) and
    ``networks`` what ``ldm_to_hub`` made of it (its shapes tell the sizes). Only names and shapes
    are read: meta tensors do.

    Sizes come from the tensor shapes, on top of the SD 1.5, 2.1, 2.1-base or SD-Turbo Hub configs.
    What the shapes cannot tell comes from ``original_config`` (the LDM or sgm yaml of the
    checkpoint, or a sidecar, see ``read_sidecar``) and otherwise from SD's conventions:

    * prediction type: ``prediction_type`` if given; else the config's; else ε for SD 1.x and v for
      SD 2.x, whose 768-px models (2.0, 2.1) predict v, but ε for SD 2 inpainting (a 9-channel
      UNet, 512 px). SD 2.x-base and other ε-prediction SD 2.x checkpoints need
      ``prediction_type="epsilon"`` or a sidecar saying so. A file in sgm's layout
      (text encoder under ``conditioner.embedders.0.model``) is taken for SD-Turbo, the one SD 2.x
      model Stability released in that layout: ε, and SD-Turbo's scheduler config (trailing
      timestep spacing, so that 1-4 steps start at t = 999). Its tensors are those of SD 2.1 and
      cannot tell; a v-prediction argument or sidecar makes it a 768-px SD 2.1 instead;
    * UNet heads: the config's ``num_heads`` / ``num_head_channels``; else 8 per level (SD 1.x) or
      one per 64 channels (SD 2.x);
    * text encoder heads: one per 64 channels (both CLIP ViT-L/14 and OpenCLIP ViT-H/14);
    * GroupNorm: 32 groups, hard-coded in LDM's UNet and VAE;
    * tokenizer padding: SD 2.x pads with "!" (OpenCLIP's tokenizer pads with id 0), SD 1.x with
      the end-of-text token.
    """
    clip_layout = _clip_layout_from_ldm(set(state))
    ldm_config = original_config or {}
    ldm_params = (ldm_config.get("model") or {}).get("params") or {}
    # An inpainting UNet also takes the mask and the masked image's latents: 2·4 + 1 input channels.
    unet = networks["unet"]
    inpainting = unet["conv_in.weight"].shape[1] == 2 * unet["conv_out.weight"].shape[0] + 1
    prediction = _prediction_type(
        prediction_type, ldm_config, ldm_params, clip_layout=clip_layout, inpainting=inpainting
    )
    family = _family(clip_layout, prediction)
    # LDM's yaml configures the UNet under unet_config, sgm's under network_config.
    unet_params = (ldm_params.get("unet_config") or ldm_params.get("network_config") or {}).get("params") or {}

    scheduler = _base_config(family, "scheduler") | {"prediction_type": prediction}
    for ldm_key, hub_key in (
        ("linear_start", "beta_start"),
        ("linear_end", "beta_end"),
        ("timesteps", "num_train_timesteps"),
    ):
        if ldm_key in ldm_params:
            scheduler[hub_key] = ldm_params[ldm_key]
    vae = _base_config(family, "vae") | _vae_sizes(networks["vae"])
    if "scale_factor" in ldm_params:
        vae["scaling_factor"] = ldm_params["scale_factor"]
    open_clip = clip_layout.open_clip
    return {
        "unet": _base_config(family, "unet") | _unet_sizes(networks["unet"], unet_params, open_clip=open_clip),
        "vae": vae,
        "clip": _base_config(family, "text_encoder") | _clip_sizes(networks["clip"]),
        "scheduler": scheduler,
        "tokenizer": {"pad_token": "!" if open_clip else "<|endoftext|>"},
    }


def _family(clip_layout: CLIPLayout, prediction: str) -> str:
    """The Hub configs a single file starts from (folders of ``_CONFIGS``)."""
    if not clip_layout.open_clip:
        return "sd15"
    if prediction == "v_prediction":
        return "sd21"
    return "sd-turbo" if clip_layout.prefix == SGM_OPEN_CLIP_PREFIX else "sd21-base"


def _prediction_type(
    prediction_type: str | None,
    ldm_config: Mapping[str, Any],
    ldm_params: Mapping[str, Any],
    *,
    clip_layout: CLIPLayout,
    inpainting: bool,
) -> str:
    if prediction_type is None:
        prediction_type = ldm_config.get("prediction_type")
    if prediction_type is None and "parameterization" in ldm_params:
        parameterization = ldm_params["parameterization"]
        prediction_type = _prediction_named("LDM parameterization", parameterization, _LDM_PARAMETERIZATIONS)
    scaling = ((ldm_params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}
    if prediction_type is None and "target" in scaling:
        scaling_class = str(scaling["target"]).rsplit(".", 1)[-1]  # sgm.modules.[...].EpsScaling
        prediction_type = _prediction_named("sgm denoiser scaling", scaling_class, _SGM_SCALINGS)
    if prediction_type is None:
        # SD 2.0 / 2.1 (768 px) predict v; SD 1.x, SD 2 inpainting (512 px, a 9-channel UNet) and
        # SD-Turbo (sgm's layout) predict ε.
        v_prediction = clip_layout.prefix == OPEN_CLIP_PREFIX and not inpainting
        prediction_type = "v_prediction" if v_prediction else "epsilon"
        logger.info("assuming %s prediction (text encoder under %s*)", prediction_type, clip_layout.prefix)
    check_prediction_type(prediction_type)
    return prediction_type


def _prediction_named(what: str, name: Any, prediction_types: Mapping[str, str]) -> str:
    """The prediction type a config's own word for it names."""
    if name not in prediction_types:
        raise LDMLayoutError(f"{what} {name!r} is not supported; valid: {sorted(prediction_types)}")
    return prediction_types[name]


def _base_config(family: str, component: str) -> dict[str, Any]:
    if component == "scheduler":
        path = _CONFIGS / family / "scheduler" / "scheduler_config.json"
    else:
        path = _CONFIGS / _NETWORK_CONFIGS.get(family, family) / component / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _unet_sizes(unet: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any], *, open_clip: bool) -> dict[str, Any]:
    layout = _unet_layout_from_hub(set(unet))
    channels = [unet[f"down_blocks.{level}.resnets.0.conv1.weight"].shape[0] for level in range(layout.levels)]
    attention = [level for level in range(layout.levels) if layout.down_attention[level]]
    if not attention:
        raise LDMLayoutError("the UNet has no attention levels: not an SD 1.x/2.x UNet")
    first = f"down_blocks.{attention[0]}.attentions.0."
    depth = [
        len(_numbers(set(unet), rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")) if has else 1
        for level, has in enumerate(layout.down_attention)
    ]
    # LDM's num_heads = -1 means "use num_head_channels" (openaimodel.UNetModel).
    num_heads, head_channels = unet_params.get("num_heads", -1), unet_params.get("num_head_channels", -1)
    if num_heads == -1 and head_channels == -1:
        num_heads, head_channels = (-1, 64) if open_clip else (8, -1)
    if num_heads != -1:
        heads = [num_heads] * layout.levels
    elif any(c % head_channels for c in channels):
        raise LDMLayoutError(
            f"UNet channels {channels} are not multiples of {head_channels}-channel heads: "
            "give the checkpoint's LDM config (num_heads or num_head_channels) as a sidecar"
        )
    else:
        heads = [c // head_channels for c in channels]
    sizes = {
        "in_channels": unet["conv_in.weight"].shape[1],
        "out_channels": unet["conv_out.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        # The Hub's quirk: `attention_head_dim` holds head counts for SD 1.x/2.x (see unet.py).
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "cross_attention_dim": unet[first + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_projection": unet[first + "proj_in.weight"].ndim == 2,  # a 1×1 conv otherwise
        "norm_num_groups": 32,
    }
    if set(depth) != {1}:
        sizes["transformer_layers_per_block"] = depth
    return sizes


def _vae_sizes(vae: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    layout = _vae_layout_from_hub(set(vae))
    return {
        "in_channels": vae["encoder.conv_in.weight"].shape[1],
        "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "latent_channels": vae["post_quant_conv.weight"].shape[0],
        "block_out_channels": [
            vae[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(layout.levels)
        ],
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * layout.levels,
        "up_block_types": ["UpDecoderBlock2D"] * layout.levels,
        "norm_num_groups": 32,
    }


def _clip_sizes(clip: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    vocab_size, hidden_size = clip["text_model.embeddings.token_embedding.weight"].shape
    if hidden_size % 64:
        raise LDMLayoutError(f"text encoder width {hidden_size} is not a multiple of CLIP's 64-channel heads")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": clip["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_numbers(set(clip), r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": hidden_size // 64,
        "max_position_embeddings": clip["text_model.embeddings.position_embedding.weight"].shape[0],
    }
