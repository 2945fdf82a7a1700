"""The LDM single-file map (stable_diffusion/single_file.py).

Checked three ways: against the complete key lists of the real SD 1.5 and SD 2.1 single files, and
the one reconstructed for SD-Turbo (every tensor consumed, exactly the Hub-layout names and shapes
of diffusers' / transformers' networks built from the real configs come out, and back); against
diffusers' own LDM converters, which must read the LDM names we write; and by the configs it
derives from the shapes.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from ldm_export import hub_to_ldm
from torch import nn

from stable_diffusion import single_file
from stable_diffusion.schedules import SchedulerConfig
from stable_diffusion.single_file import (
    LDMLayoutError,
    hub_configs,
    ldm_to_hub,
    read_sidecar,
)

# The Hub repos whose network configs describe each kind of single file (SD-Turbo: 2.1-base's).
REPOS = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1", "sd-turbo": "stable-diffusion-2-1-base"}
KEY_LISTS = {
    "sd1": "stable-diffusion-v1-5/single-file-keys.json",
    "sd2": "stable-diffusion-2-1/single-file-keys.json",
    "sd-turbo": "sd-turbo/reconstructed-single-file-keys.json",  # see the fixtures' README
}
SGM_SD_TURBO_SIZE = 5_214_561_328  # bytes of stabilityai/sd-turbo's sd_turbo.safetensors
SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}

# The LDM config a tiny SD 2.x-shaped checkpoint ships with: its 16-channel heads are not SD's 64.
TINY_SD2_SIDECAR = {
    "model": {
        "params": {
            "parameterization": "v",
            "unet_config": {"params": {"num_head_channels": 16, "use_linear_in_transformer": True}},
        }
    }
}
# A few tensors of SDXL's single files (Podell et al. 2023), with the shapes of its configs.
SDXL_BASE = {
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768],
    "conditioner.embedders.1.model.ln_final.weight": [1280],
    "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
    "first_stage_model.decoder.conv_out.weight": [3, 128, 3, 3],
}
SDXL_REFINER = {
    "conditioner.embedders.0.model.ln_final.weight": [1280],
    "model.diffusion_model.label_emb.0.0.weight": [1536, 2560],
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [768, 1280],
    "first_stage_model.decoder.conv_out.weight": [3, 128, 3, 3],
}


def sgm_yaml(*, scaling: str | None = None, num_head_channels: int | None = None) -> dict:
    """The parts of an sgm inference yaml (generative-models' configs/inference/sd_2_1.yaml) we read."""
    params: dict = {}
    if scaling is not None:
        target = f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"
        params["denoiser_config"] = {"params": {"scaling_config": {"target": target}}}
    if num_head_channels is not None:
        params["network_config"] = {"params": {"num_head_channels": num_head_channels}}
    return {"model": {"params": params}}


# The sidecar of a tiny SD-Turbo: its 16-channel heads, and no word on the prediction type.
TINY_SD_TURBO_SIDECAR = sgm_yaml(num_head_channels=16)


def real_ldm_keys(hub_layouts: Path, kind: str) -> dict[str, list[int]]:
    return json.loads((hub_layouts / KEY_LISTS[kind]).read_text())


def meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def configs_of(state: dict[str, torch.Tensor], **options) -> dict[str, dict]:
    """``hub_configs`` as the loader calls it: on the file and the networks mapped from it."""
    return hub_configs(state, ldm_to_hub(state), **options)


def hub_state(network: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """A reference network's state dict in the Hub layout (transformers 5 drops ``text_model.``)."""
    state = model.state_dict()
    if network == "clip":
        return {name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in state.items()}
    return dict(state)


def reference_networks_on_meta(hub_layouts: Path, kind: str) -> dict[str, nn.Module]:
    """diffusers' / transformers' networks built from the real Hub configs, without weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    repo = hub_layouts / REPOS[kind]
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(json.loads((repo / "unet" / "config.json").read_text())),
            "vae": AutoencoderKL.from_config(json.loads((repo / "vae" / "config.json").read_text())),
            "clip": CLIPTextModel(CLIPTextConfig.from_pretrained(repo / "text_encoder")),
        }


def build_tiny_ldm_reference(kind: str, seed: int = 0) -> dict[str, nn.Module]:
    """Tiny random diffusers / transformers networks an LDM single file can describe.

    LDM hard-codes 32 GroupNorm groups, and CLIP's 64-channel heads are read by convention, so
    these differ from conftest's tiny pipeline. The SD 2.x one has OpenCLIP's 23 Hub layers (the
    file gets the 24th), so that diffusers' converter, which skips block 23 by name, applies.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = kind != "sd1"  # SD-Turbo's networks are SD 2.1's
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=(2, 4, 4) if sd2 else 8,  # head counts: 16 channels each for SD 2.x (sidecar)
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=23 if sd2 else 2,
            num_attention_heads=2,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
        )
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "clip": clip.eval()}


@functools.cache
def _tiny_ldm_state(kind: str) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    networks = build_tiny_ldm_reference(kind)
    return networks, hub_to_ldm({n: hub_state(n, m) for n, m in networks.items()}, kind=kind)


def tiny_ldm_state(kind: str) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """The tiny reference networks (built once per session; do not modify) and a new dict of
    their LDM single-file state, written by our hub_to_ldm."""
    networks, ldm = _tiny_ldm_state(kind)
    return networks, dict(ldm)


# ------------------------------------------------------------------------------ real key lists
def safetensors_size(shapes: dict[str, list[int]]) -> int:
    """Bytes of a float32 safetensors file of these tensors, without metadata: an 8-byte header
    length, the JSON header (tensors by name, padded with spaces to 8 bytes), then the data."""
    header, offset = {}, 0
    for name in sorted(shapes):
        end = offset + 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [offset, end]}
        offset = end
    header_bytes = len(json.dumps(header, separators=(",", ":")))
    return 8 + header_bytes + -header_bytes % 8 + offset


def test_sd_turbo_key_list_has_the_real_file_size(hub_layouts: Path) -> None:
    """The reconstructed SD-Turbo list (see the fixtures' README) fills the real file to the byte;
    its names with LDM's prefix, or without the σ buffer, do not."""
    shapes = real_ldm_keys(hub_layouts, "sd-turbo")
    assert safetensors_size(shapes) == SGM_SD_TURBO_SIZE
    ldm_names = {name.replace("conditioner.embedders.0.", "cond_stage_model.", 1): s for name, s in shapes.items()}
    assert safetensors_size(ldm_names) != SGM_SD_TURBO_SIZE
    assert safetensors_size({n: s for n, s in shapes.items() if n != "denoiser.sigmas"}) != SGM_SD_TURBO_SIZE


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd-turbo"])
def test_real_single_file_maps_onto_the_hub_networks(hub_layouts: Path, kind: str) -> None:
    shapes = real_ldm_keys(hub_layouts, kind)
    assert len(shapes) == {"sd1": 1145, "sd2": 1242, "sd-turbo": 1229}[kind]
    hub = ldm_to_hub(meta_state(shapes))  # raises on any tensor neither mapped nor allow-listed
    references = reference_networks_on_meta(hub_layouts, kind)
    for network, model in references.items():
        expected = {name: tuple(t.shape) for name, t in hub_state(network, model).items()}
        got = {name: tuple(t.shape) for name, t in hub[network].items()}
        assert got == expected, network
    assert len(hub["unet"]) == 686 and len(hub["vae"]) == 248
    assert len(hub["clip"]) == {"sd1": 196, "sd2": 23 * 16 + 4, "sd-turbo": 23 * 16 + 4}[kind]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd-turbo"])
def test_hub_to_ldm_writes_every_real_checkpoint_tensor(hub_layouts: Path, kind: str) -> None:
    """Back from the Hub layout we get the real file's names and shapes, but for the LDM
    training state (schedule buffers, EMA bookkeeping): so the allow-list skips exactly those,
    plus what hub_to_ldm makes up (position ids; OpenCLIP's head and unused last block)."""
    shapes = real_ldm_keys(hub_layouts, kind)
    references = reference_networks_on_meta(hub_layouts, kind)
    ldm = hub_to_ldm({n: hub_state(n, m) for n, m in references.items()}, kind=kind)
    training_state = SCHEDULE_BUFFERS | {"model_ema.decay", "model_ema.num_updates", "denoiser.sigmas"}
    expected = {name: tuple(shape) for name, shape in shapes.items() if name not in training_state}
    assert {name: tuple(t.shape) for name, t in ldm.items()} == expected
    made_up = {name for name in shapes if single_file._SKIPPED.fullmatch(name)} - training_state
    open_clip = {"sd2": "cond_stage_model.model.", "sd-turbo": "conditioner.embedders.0.model."}
    assert made_up == (
        {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
        if kind == "sd1"
        else {open_clip[kind] + "text_projection", open_clip[kind] + "logit_scale"}
    )


# ---------------------------------------------------------------------- diffusers' converters
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd-turbo"])
def test_diffusers_converters_read_the_ldm_names_we_write(kind: str) -> None:
    """Our LDM names are the real ones: diffusers' single-file converters turn our hub_to_ldm
    output back into exactly the tensors we started from, and so does our ldm_to_hub. (diffusers
    reads an OpenCLIP tower under sgm's ``conditioner.embedders.0.model.`` for SDXL's refiner.)"""
    from diffusers.loaders import single_file_utils as converters

    networks, ldm = tiny_ldm_state(kind)
    expected = {n: hub_state(n, m) for n, m in networks.items()}
    if kind == "sd2":
        clip = converters.convert_open_clip_checkpoint(networks["clip"], ldm)
    elif kind == "sd-turbo":
        clip = converters.convert_open_clip_checkpoint(networks["clip"], ldm, prefix="conditioner.embedders.0.model.")
        # diffusers' list of tensors to skip (block 23, the projection) names them under LDM's prefix only.
        clip = {k: t for k, t in clip.items() if not k.startswith(("text_model.encoder.layers.23.", "text_projection"))}
    else:
        clip = converters.convert_ldm_clip_checkpoint(ldm)
        clip.pop("text_model.embeddings.position_ids")  # a buffer diffusers carries over
    theirs = {
        "unet": converters.convert_ldm_unet_checkpoint(ldm, networks["unet"].config),
        "vae": converters.convert_ldm_vae_checkpoint(ldm, networks["vae"].config),
        "clip": clip,
    }
    ours = ldm_to_hub(ldm)
    for network, reference in expected.items():
        for converted in (theirs[network], ours[network]):
            assert converted.keys() == reference.keys(), network
            for name, tensor in reference.items():
                assert torch.equal(converted[name], tensor), f"{network} {name}"


def test_unavoidable_transforms() -> None:
    """VAE attention: 1×1 conv in LDM, linear in the Hub layout; OpenCLIP: q, k, v fused on dim 0."""
    networks, ldm = tiny_ldm_state("sd2")
    vae, clip = hub_state("vae", networks["vae"]), hub_state("clip", networks["clip"])
    conv = ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"]
    assert conv.shape == (64, 64, 1, 1)
    assert torch.equal(conv[:, :, 0, 0], vae["decoder.mid_block.attentions.0.to_out.0.weight"])
    fused = ldm["cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"]
    layer = "text_model.encoder.layers.3.self_attn."
    assert torch.equal(fused, torch.cat([clip[layer + f"{p}_proj.weight"] for p in "qkv"]))


def test_hub_to_ldm_unused_open_clip_block_is_an_identity() -> None:
    """The made-up 24th block returns its input: SD never runs it, other tools may."""
    _, ldm = tiny_ldm_state("sd2")
    block = "cond_stage_model.model.transformer.resblocks.23."
    x = torch.randn(2, 5, 128)
    h = torch.nn.functional.layer_norm(x, (128,), ldm[block + "ln_1.weight"], ldm[block + "ln_1.bias"])
    attn = torch.nn.functional.linear(h, ldm[block + "attn.out_proj.weight"], ldm[block + "attn.out_proj.bias"])
    y = x + attn
    h = torch.nn.functional.layer_norm(y, (128,), ldm[block + "ln_2.weight"], ldm[block + "ln_2.bias"])
    mlp = torch.nn.functional.linear(
        torch.nn.functional.gelu(
            torch.nn.functional.linear(h, ldm[block + "mlp.c_fc.weight"], ldm[block + "mlp.c_fc.bias"])
        ),
        ldm[block + "mlp.c_proj.weight"],
        ldm[block + "mlp.c_proj.bias"],
    )
    assert torch.equal(y + mlp, x)


def test_sd1_text_encoder_without_the_text_model_level() -> None:
    """Some SD 1.x files lack the text_model. level: cond_stage_model.transformer.encoder.*."""
    networks, ldm = tiny_ldm_state("sd1")
    old = {
        name.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): t
        for name, t in ldm.items()
    }
    clip = ldm_to_hub(old)["clip"]
    expected = hub_state("clip", networks["clip"])
    assert clip.keys() == expected.keys()
    assert all(torch.equal(clip[name], t) for name, t in expected.items())


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd-turbo"])
def test_configs_from_shapes_match_the_real_configs(hub_layouts: Path, kind: str) -> None:
    configs = configs_of(meta_state(real_ldm_keys(hub_layouts, kind)))
    repo = hub_layouts / REPOS[kind]
    for network, sub in (("unet", "unet"), ("vae", "vae"), ("clip", "text_encoder")):
        real = json.loads((repo / sub / "config.json").read_text())
        if network == "unet":
            real.setdefault("use_linear_projection", False)  # SD 1.5's config predates the key
        assert {k: v for k, v in configs[network].items() if not k.startswith("_")} == {
            k: v for k, v in real.items() if not k.startswith("_")
        }, network
    assert configs["scheduler"]["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    assert configs["tokenizer"] == {"pad_token": "<|endoftext|>" if kind == "sd1" else "!"}


def test_sd_turbo_gets_its_scheduler_config(hub_layouts: Path) -> None:
    """A file in sgm's layout is SD-Turbo: ε and trailing spacing (one step starts at t = 999).
    Its tensors are SD 2.1's; sgm's yaml saying VScaling makes it a 768-px SD 2.1 instead."""
    state = meta_state(real_ldm_keys(hub_layouts, "sd-turbo"))
    configs = configs_of(state)
    real = json.loads((hub_layouts / "sd-turbo" / "scheduler" / "scheduler_config.json").read_text())
    assert configs["scheduler"] == real
    scheduler = SchedulerConfig.from_hub_config(configs["scheduler"])
    assert (scheduler.prediction_type, scheduler.timestep_spacing) == ("epsilon", "trailing")
    v = configs_of(state, original_config=sgm_yaml(scaling="VScaling"))
    assert v["scheduler"]["prediction_type"] == "v_prediction" and v["unet"]["sample_size"] == 96


def test_configs_read_the_ldm_yaml(hub_layouts: Path) -> None:
    original = yaml.safe_load((hub_layouts / "stable-diffusion-v1-5" / "v1-inference.yaml").read_text())
    original["model"]["params"] |= {"linear_start": 0.001, "scale_factor": 0.2}
    configs = configs_of(meta_state(real_ldm_keys(hub_layouts, "sd1")), original_config=original)
    assert configs["unet"]["attention_head_dim"] == 8  # num_heads: 8
    assert configs["scheduler"]["beta_start"] == 0.001
    assert configs["scheduler"]["beta_end"] == 0.012
    assert configs["vae"]["scaling_factor"] == 0.2


def test_tiny_configs_use_the_sidecar_heads() -> None:
    _, ldm = tiny_ldm_state("sd2")
    with pytest.raises(LDMLayoutError, match="num_head_channels"):
        configs_of(ldm)  # SD 2.x convention: 64-channel heads, which 32 channels cannot hold
    configs = configs_of(ldm, original_config=TINY_SD2_SIDECAR)
    assert configs["unet"]["attention_head_dim"] == [2, 4, 4]
    assert configs["clip"]["num_attention_heads"] == 2 and configs["clip"]["hidden_act"] == "gelu"
    assert configs["clip"]["num_hidden_layers"] == 23


@pytest.mark.parametrize(
    ("argument", "sidecar", "expected"),
    [
        (None, None, "v_prediction"),  # SD 2.x default: the 768-px models predict v
        (None, {"model": {"params": {"parameterization": "eps"}}}, "epsilon"),
        (None, {"prediction_type": "epsilon"}, "epsilon"),
        (None, sgm_yaml(scaling="EpsScaling"), "epsilon"),
        ("epsilon", {"model": {"params": {"parameterization": "v"}}}, "epsilon"),  # the argument wins
    ],
)
def test_prediction_type_sources(hub_layouts: Path, argument, sidecar, expected) -> None:
    state = meta_state(real_ldm_keys(hub_layouts, "sd2"))
    configs = configs_of(state, prediction_type=argument, original_config=sidecar)
    assert configs["scheduler"]["prediction_type"] == expected
    # The 768-px 2.x models (v) upcast attention and default to 96×96 latents; 2.x-base does not.
    assert configs["unet"]["sample_size"] == (96 if expected == "v_prediction" else 64)


def test_prediction_type_errors_name_the_choices(hub_layouts: Path) -> None:
    state = meta_state(real_ldm_keys(hub_layouts, "sd1"))
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        configs_of(state, prediction_type="v")
    with pytest.raises(LDMLayoutError, match="'eps', 'v'"):
        configs_of(state, original_config={"model": {"params": {"parameterization": "x0"}}})
    with pytest.raises(LDMLayoutError, match="'EpsScaling', 'VScaling'"):
        configs_of(state, original_config=sgm_yaml(scaling="EDMScaling"))


def test_read_sidecar(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    assert read_sidecar(checkpoint) is None
    (tmp_path / "model.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert read_sidecar(checkpoint) == {"prediction_type": "v_prediction"}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TINY_SD2_SIDECAR))
    assert read_sidecar(checkpoint) == TINY_SD2_SIDECAR  # .yaml first, as the web UIs look for it
    (tmp_path / "model.yaml").write_text("- a list\n")
    with pytest.raises(LDMLayoutError, match="mapping"):
        read_sidecar(checkpoint)


# -------------------------------------------------------------------------------------- errors
def test_unknown_tensors_are_named(hub_layouts: Path) -> None:
    state = meta_state(real_ldm_keys(hub_layouts, "sd1"))
    state["model.diffusion_model.input_blocks.1.2.weight"] = torch.empty(3, device="meta")
    with pytest.raises(LDMLayoutError, match=r"1 tensors .* model\.diffusion_model\.input_blocks\.1\.2\.weight"):
        ldm_to_hub(state)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.out.2.weight",
            ],
            "SDXL",
        ),
        (["down_blocks.0.resnets.0.conv1.weight"], "Hub layout"),
        (["lora_unet_down_blocks_0.alpha"], "LoRA"),
        (
            ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
            r"VAE \(first_stage_model",
        ),
    ],
)
def test_other_checkpoints_are_explained(names: list[str], message: str) -> None:
    with pytest.raises(LDMLayoutError, match=message):
        ldm_to_hub({name: torch.empty(1, device="meta") for name in names})


@pytest.mark.parametrize(
    ("shapes", "evidence"),
    [
        (SDXL_BASE, r"two text encoders .*label_emb, \(1280, 2816\)"),
        (SDXL_REFINER, r"label_emb, \(1536, 2560\)"),
    ],
)
def test_sdxl_is_refused_with_its_evidence(shapes: dict[str, list[int]], evidence: str) -> None:
    with pytest.raises(LDMLayoutError, match=rf"an SDXL checkpoint \(.*{evidence}.*\)\. SDXL is not supported"):
        ldm_to_hub(meta_state(shapes))


def test_sdxl_is_told_from_sd_turbo_by_the_shapes(hub_layouts: Path) -> None:
    """sgm's one text tower under the UNet: SD-Turbo's when it is as wide as the UNet's context
    (ViT-H, 1024), not when it is SDXL's bigG (1280)."""
    shapes = real_ldm_keys(hub_layouts, "sd-turbo") | {"conditioner.embedders.0.model.ln_final.weight": [1280]}
    with pytest.raises(LDMLayoutError, match="SDXL checkpoint .*1024-wide text states from a 1280-wide text encoder"):
        ldm_to_hub(meta_state(shapes))
