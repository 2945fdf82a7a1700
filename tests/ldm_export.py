"""Hub layout -> one single file: the inverse of ``stable_diffusion.single_file.ldm_to_hub``.

A test helper: the package only reads single files. Tests write their tiny reference networks in
the single-file layouts with it (checked against the real key lists and diffusers' converters in
test_single_file.py), so that loading them through the production map can be checked for parity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from stable_diffusion.single_file import (
    CLIP_PREFIX,
    NETWORKS,
    OPEN_CLIP_PREFIX,
    SGM_OPEN_CLIP_PREFIX,
    CLIPLayout,
    LDMLayoutError,
    _numbers,
    _unet_layout_from_hub,
    _vae_layout_from_hub,
    clip_rules,
    unet_rules,
    vae_rules,
)

# Where each kind of single file keeps its text encoder: SD 1.x's CLIP, SD 2.x's OpenCLIP in
# LDM's layout, and SD-Turbo's OpenCLIP in sgm's layout.
TEXT_ENCODER_PREFIXES = {"sd1": CLIP_PREFIX, "sd2": OPEN_CLIP_PREFIX, "sd-turbo": SGM_OPEN_CLIP_PREFIX}


def hub_to_ldm(networks: Mapping[str, Mapping[str, torch.Tensor]], *, kind: str) -> dict[str, torch.Tensor]:
    """The inverse of ``ldm_to_hub``: one LDM single-file state dict from the Hub-layout
    ``"unet"``, ``"vae"`` and ``"clip"`` state dicts (CLIP names with or without ``text_model.``).

    ``kind`` (one of ``TEXT_ENCODER_PREFIXES``) says where the text encoder goes: SD 1.x's CLIP
    (``cond_stage_model.transformer.*``), SD 2.x's OpenCLIP (``cond_stage_model.model.*``) or
    SD-Turbo's (``conditioner.embedders.0.model.*``). The result holds every tensor a released
    checkpoint holds except the schedule buffers (SD-Turbo's ``denoiser.sigmas`` included) and EMA
    bookkeeping, so other tools that expect them load it. What the Hub layout dropped is made up
    so as to change nothing SD computes: OpenCLIP's last resblock becomes an identity (zero output
    projections: x + 0 + 0), ``text_projection`` the identity matrix and ``logit_scale`` CLIP's
    initial log(1/0.07) (Radford et al. 2021, sec. 2.5).
    """
    if kind not in TEXT_ENCODER_PREFIXES:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(TEXT_ENCODER_PREFIXES)}")
    missing = [network for network in NETWORKS if network not in networks]
    if missing:
        raise ValueError(f"hub_to_ldm needs state dicts for {list(NETWORKS)}; missing {missing}")
    hub = {
        "unet": dict(networks["unet"]),
        "vae": dict(networks["vae"]),
        "clip": {
            name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in networks["clip"].items()
        },
    }
    layers = len(_numbers(set(hub["clip"]), r"text_model\.encoder\.layers\.(\d+)\."))
    clip_layout = CLIPLayout(TEXT_ENCODER_PREFIXES[kind], layers)
    rules = (
        unet_rules(_unet_layout_from_hub(set(hub["unet"])))
        + vae_rules(_vae_layout_from_hub(set(hub["vae"])))
        + clip_rules(clip_layout)
    )
    ldm: dict[str, torch.Tensor] = {}
    consumed: dict[str, set[str]] = {network: set() for network in NETWORKS}
    for rule in rules:
        source, used = hub[rule.network], consumed[rule.network]
        if rule.suffixes is None:
            pairs = [(name[len(rule.hub) :], name) for name in source if name.startswith(rule.hub) and name not in used]
            for suffix, name in pairs:
                ldm[rule.ldm + suffix] = source[name]
                used.add(name)
            continue
        for ldm_suffix, hub_suffix in rule.suffixes.items():
            if rule.transform == "fused_qkv":
                parts = [rule.hub + hub_suffix.format(part) for part in "qkv"]
                if all(part in source for part in parts):
                    ldm[rule.ldm + ldm_suffix] = torch.cat([source[part] for part in parts])
                    used.update(parts)
            elif (name := rule.hub + hub_suffix) in source:
                tensor = source[name]
                ldm[rule.ldm + ldm_suffix] = tensor[:, :, None, None] if rule.transform == "conv1x1" else tensor
                used.add(name)
    left = [f"{network} {name}" for network in NETWORKS for name in sorted(hub[network].keys() - consumed[network])]
    if left:
        raise LDMLayoutError(
            f"{len(left)} Hub-layout tensors have no place in an LDM checkpoint: {', '.join(left[:10])}"
        )
    if clip_layout.open_clip:
        ldm.update(_unused_open_clip_tensors(hub["clip"], clip_layout))
    else:
        positions = hub["clip"]["text_model.embeddings.position_embedding.weight"].shape[0]
        ldm[f"{CLIP_PREFIX}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return ldm


def _unused_open_clip_tensors(clip: Mapping[str, torch.Tensor], layout: CLIPLayout) -> dict[str, torch.Tensor]:
    embedding = clip["text_model.embeddings.token_embedding.weight"]
    width, inner = embedding.shape[1], clip["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    like = {"dtype": embedding.dtype, "device": embedding.device}
    block = f"{layout.prefix}transformer.resblocks.{layout.layers}."
    shapes = {
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_1.bias": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (inner, width),
        "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (width, inner),
        "mlp.c_proj.bias": (width,),
    }
    tensors = {block + suffix: torch.zeros(shape, **like) for suffix, shape in shapes.items()}
    tensors |= {block + "ln_1.weight": torch.ones(width, **like), block + "ln_2.weight": torch.ones(width, **like)}
    tensors[f"{layout.prefix}text_projection"] = torch.eye(width, **like)
    tensors[f"{layout.prefix}logit_scale"] = torch.tensor(math.log(1 / 0.07), **like)
    return tensors
