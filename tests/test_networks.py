"""Parity of our text encoder, UNet and VAE with transformers' / diffusers' reference models.

Each reference is built with random weights from our config's ``to_hub_config()`` (which also checks
that transformers / diffusers accept it), its ``state_dict()`` goes through the production weight
map into our network, and both run on the same inputs: max|Δ| < 1e-4 in float32.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers import UNet2DConditionModel

from stable_diffusion import cpu_conv, weights
from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.layers import guidance_scale_embedding, timestep_embedding
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import AutoencoderKL, VAEConfig

TOL = 1e-4
REPOS = ("stable-diffusion-v1-5", "stable-diffusion-2-1", "stable-diffusion-2-1-base")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def perturb_vectors(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """Moves biases and norm scales off their 0 / 1 initialisation, so a mis-mapped one shows up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def ours_from(reference: torch.nn.Module, network: str, cls: type, config: object) -> torch.nn.Module:
    model = weights.build_on_meta(cls, config)
    return weights.load_into(model, weights.hub_to_ours(network, reference.state_dict())).eval()


def read_hub_config(hub_layouts: Path, repo: str, component: str) -> dict:
    return json.loads((hub_layouts / repo / component / "config.json").read_text())


# ---------------------------------------------------------------- text encoder

CLIP_CONFIGS = {
    "sd1-shaped": CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4),
    "sd2-shaped": CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=64, num_layers=3, num_heads=2, hidden_act="gelu"
    ),
}


def reference_clip(config: CLIPTextConfig, *, seed: int = 0) -> transformers.CLIPTextModel:
    torch.manual_seed(seed)
    reference_config = transformers.CLIPTextConfig.from_dict(config.to_hub_config())
    return perturb_vectors(transformers.CLIPTextModel(reference_config), seed=seed)


def check_clip_parity(config: CLIPTextConfig, input_ids: torch.Tensor) -> None:
    reference = reference_clip(config)
    ours = ours_from(reference, "clip", CLIPTextModel, config)
    with torch.no_grad():
        out = reference(input_ids, output_hidden_states=True)
        assert max_abs_diff(ours(input_ids), out.last_hidden_state) < TOL
        for skip in (1, 2):
            # transformers' hidden_states[-1 - k] is the output of block num_layers - k, before the final LN.
            expected = reference.final_layer_norm(out.hidden_states[-1 - skip])
            assert max_abs_diff(ours(input_ids, skip_last_layers=skip), expected) < TOL


@pytest.mark.parametrize("shape", list(CLIP_CONFIGS))
@pytest.mark.parametrize("seq_len", [77, 9])
def test_clip_matches_transformers(shape: str, seq_len: int) -> None:
    input_ids = torch.randint(0, 49408, (2, seq_len), generator=torch.Generator().manual_seed(1))
    check_clip_parity(CLIP_CONFIGS[shape], input_ids)


def test_clip_rejects_bad_arguments() -> None:
    model = CLIPTextModel(CLIPTextConfig.tiny())
    ids = torch.zeros(1, 77, dtype=torch.long)
    with pytest.raises(ValueError, match="skip_last_layers"):
        model(ids, skip_last_layers=2)
    with pytest.raises(ValueError, match="77 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, hidden_act="relu")


# ---------------------------------------------------------------- UNet

UNET_CONFIGS = {
    # conv projections, one head count everywhere, like SD 1.x
    "sd1-shaped": UNetConfig(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_levels=(True, True, False),
        num_heads=(2, 2, 2),
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
    # linear projections, per-level head counts, upcast attention, like SD 2.x; deeper transformers too
    "sd2-shaped": UNetConfig(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_levels=(True, True, False),
        num_heads=(2, 4, 8),
        cross_attention_dim=40,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 2),
        norm_num_groups=8,
        upcast_attention=True,
    ),
}


@pytest.fixture(scope="module", params=list(UNET_CONFIGS))
def unet_pair(request: pytest.FixtureRequest) -> tuple[UNetConfig, UNet2DConditionModel, UNet]:
    config = UNET_CONFIGS[request.param]
    torch.manual_seed(0)
    reference = perturb_vectors(UNet2DConditionModel.from_config(config.to_hub_config()), seed=0)
    return config, reference, ours_from(reference, "unet", UNet, config)


@pytest.mark.parametrize(
    ("batch", "t"),
    [
        (1, 999),
        (2, 0),
        (2, 17.25),  # fractional, as Karras-σ samplers produce
        (2, torch.tensor(421)),  # 0-dim tensor
        (2, torch.tensor([3.0, 500.5])),  # one per batch element
        (1, torch.tensor([250])),
    ],
)
def test_unet_matches_diffusers(unet_pair, batch: int, t) -> None:
    config, reference, ours = unet_pair
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 16, 16, generator=generator)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = reference(x, t, context).sample
        assert max_abs_diff(ours(x, t, context), expected) < TOL


@pytest.mark.parametrize("algorithm", [None, *cpu_conv.ALGORITHMS])
def test_unet_latent_sides_not_multiple_of_downsampling(unet_pair, monkeypatch, algorithm: str | None) -> None:
    """Also with every convolution by oneDNN or by im2col (what ``cpu_conv`` chooses between)."""
    if algorithm is not None:
        monkeypatch.setenv(cpu_conv.CPU_CONV_ENV, algorithm)
    config, reference, ours = unet_pair
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 10, 6, generator=generator)  # 10 -> 5 -> 3 and 6 -> 3 -> 2
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    t = torch.tensor([3.0, 500.5])
    with torch.no_grad():
        assert max_abs_diff(ours(x, t, context), reference(x, t, context).sample) < TOL


def test_unet_rejects_wrong_timestep_count() -> None:
    model = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match="one value per batch element"):
        model(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.zeros(2, 77, 32))


# SD 1.5-shaped with the guidance-embedding input of LCM-distilled UNets (LCM_Dreamshaper_v7: 256).
LCM_UNET_CONFIG = dataclasses.replace(UNET_CONFIGS["sd1-shaped"], time_cond_proj_dim=20)


@pytest.mark.parametrize(("batch", "cond_batch"), [(2, 2), (2, 1), (1, 1)])
def test_unet_with_guidance_embedding_matches_diffusers(batch: int, cond_batch: int) -> None:
    torch.manual_seed(0)
    reference = perturb_vectors(UNet2DConditionModel.from_config(LCM_UNET_CONFIG.to_hub_config()), seed=0)
    assert reference.config.time_cond_proj_dim == 20
    ours = ours_from(reference, "unet", UNet, LCM_UNET_CONFIG)
    assert ours.time_embedding.cond_proj.weight.shape == (32, 20)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 16, 16, generator=generator)
    context = torch.randn(batch, 77, LCM_UNET_CONFIG.cross_attention_dim, generator=generator)
    # LCM pipelines embed w = guidance_scale - 1; a large w makes a mis-wired embedding show.
    w = torch.tensor([7.5, 3.0])[:cond_batch]
    cond = guidance_scale_embedding(w, 20)
    with torch.no_grad():
        expected = reference(x, 499, context, timestep_cond=cond).sample
        assert max_abs_diff(ours(x, 499, context, timestep_cond=cond), expected) < TOL
        # The condition changes the output (it is not silently dropped).
        assert max_abs_diff(ours(x, 499, context, timestep_cond=torch.zeros_like(cond)), expected) > 100 * TOL


def test_guidance_scale_embedding_matches_diffusers() -> None:
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0, 7.5, 13.7, 1 / 3])
    for dim in (256, 512, 33, 20):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        # The same float32 operations in the same order: equal, not merely close.
        assert torch.equal(guidance_scale_embedding(w, dim), expected), dim


def test_unet_checks_its_guidance_embedding_input() -> None:
    plain = UNet(UNetConfig.tiny())
    lcm = UNet(dataclasses.replace(UNetConfig.tiny(), time_cond_proj_dim=8))
    x, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        plain(x, 1, context, timestep_cond=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="guidance_scale_embedding"):
        lcm(x, 1, context)
    with pytest.raises(ValueError, match=r"\[1 or 2, 8\]"):
        lcm(x, 1, context, timestep_cond=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="1-D"):
        guidance_scale_embedding(torch.zeros(2, 1), 8)


@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("freq_shift", [0, 1])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos: bool, freq_shift: int) -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 999.0, 0.5, 321.75])
    expected = get_timestep_embedding(t, 33, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
    ours = timestep_embedding(t, 33, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift)
    assert max_abs_diff(ours, expected) < TOL
    # integer steps embed exactly like the same float steps
    ints = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert torch.equal(ints, timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 32))


# ---------------------------------------------------------------- VAE

VAE_CONFIGS = {
    "one-layer": VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
    "two-layer": VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8),
}


@pytest.fixture(scope="module", params=list(VAE_CONFIGS))
def vae_pair(request: pytest.FixtureRequest) -> tuple[VAEConfig, ReferenceVAE, AutoencoderKL]:
    config = VAE_CONFIGS[request.param]
    torch.manual_seed(0)
    reference = perturb_vectors(ReferenceVAE.from_config(config.to_hub_config()), seed=0)
    return config, reference, ours_from(reference, "vae", AutoencoderKL, config)


def test_vae_encode_matches_diffusers(vae_pair) -> None:
    config, reference, ours = vae_pair
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
        posterior = ours.encode(images)
        assert posterior.mean.shape == (2, 4, 32 // config.downsampling_factor, 40 // config.downsampling_factor)
        assert max_abs_diff(posterior.mean, expected.mean) < TOL
        assert max_abs_diff(posterior.logvar, expected.logvar) < TOL
        assert max_abs_diff(posterior.std, expected.std) < TOL
        sample = posterior.sample(torch.Generator().manual_seed(5))
        assert max_abs_diff(sample, expected.sample(torch.Generator().manual_seed(5))) < TOL


def test_vae_decode_matches_diffusers(vae_pair) -> None:
    config, reference, ours = vae_pair
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        images = ours.decode(latents)
        assert images.shape == (2, 3, 5 * config.downsampling_factor, 7 * config.downsampling_factor)
        assert max_abs_diff(images, reference.decode(latents).sample) < TOL


def test_vae_logvar_is_clamped() -> None:
    from stable_diffusion.vae import DiagonalGaussian

    moments = torch.tensor([0.0, 0.0, 100.0, -100.0]).reshape(1, 4, 1, 1)  # 2 mean channels, 2 logvar channels
    posterior = DiagonalGaussian.from_moments(moments)
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]


# ---------------------------------------------------------------- configs

PRESETS = {
    "stable-diffusion-v1-5": (CLIPTextConfig.sd15(), UNetConfig.sd15(), VAEConfig.sd15()),
    "stable-diffusion-2-1": (CLIPTextConfig.sd21(), UNetConfig.sd21(), VAEConfig.sd21()),
    "stable-diffusion-2-1-base": (
        CLIPTextConfig.sd21(),
        dataclasses.replace(UNetConfig.sd21(), sample_size=64, upcast_attention=False),
        VAEConfig.sd21(),
    ),
}


@pytest.mark.parametrize("repo", REPOS)
def test_real_hub_configs_give_presets(hub_layouts: Path, repo: str) -> None:
    clip, unet, vae = PRESETS[repo]
    assert CLIPTextConfig.from_hub_config(read_hub_config(hub_layouts, repo, "text_encoder")) == clip
    assert UNetConfig.from_hub_config(read_hub_config(hub_layouts, repo, "unet")) == unet
    assert VAEConfig.from_hub_config(read_hub_config(hub_layouts, repo, "vae")) == vae


@pytest.mark.parametrize("preset", ["sd15", "sd21", "tiny"])
@pytest.mark.parametrize("config_cls", [CLIPTextConfig, UNetConfig, VAEConfig])
def test_hub_config_round_trip(config_cls: type, preset: str) -> None:
    config = getattr(config_cls, preset)()
    hub_config = json.loads(json.dumps(config.to_hub_config()))  # as it would be saved
    assert config_cls.from_hub_config(hub_config) == config


@pytest.mark.parametrize("repo", REPOS)
def test_full_size_structure_matches_reference(hub_layouts: Path, repo: str) -> None:
    """Every tensor name and shape of the full-size reference networks maps onto ours (on meta: no memory)."""
    builders = {
        "text_encoder": (
            "clip",
            CLIPTextConfig,
            CLIPTextModel,
            lambda d: transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(d)),
        ),
        "unet": ("unet", UNetConfig, UNet, UNet2DConditionModel.from_config),
        "vae": ("vae", VAEConfig, AutoencoderKL, ReferenceVAE.from_config),
    }
    for component, (network, config_cls, cls, build_reference) in builders.items():
        hub_config = read_hub_config(hub_layouts, repo, component)
        with torch.device("meta"):
            reference = build_reference(hub_config)
        ours = weights.build_on_meta(cls, config_cls.from_hub_config(hub_config))
        mapped = weights.hub_to_ours(network, reference.state_dict())
        expected = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
        assert {name: tuple(t.shape) for name, t in mapped.items()} == expected, component
        if component == "unet":
            # The head-count quirk: the reference's attention modules have our head counts.
            for ref_block, our_block in zip(reference.down_blocks, ours.down_blocks, strict=True):
                if our_block.attentions is not None:
                    ref_attn = ref_block.attentions[0].transformer_blocks[0].attn1
                    assert ref_attn.heads == our_block.attentions[0].transformer_blocks[0].attn1.num_heads
            assert reference.mid_block.attentions[0].transformer_blocks[0].attn2.heads == (
                ours.mid_block.attentions[0].transformer_blocks[0].attn2.num_heads
            )


def test_lcm_distilled_unet_config_and_weight_names(hub_layouts: Path) -> None:
    """SD 1.5's UNet with LCM_Dreamshaper_v7's time_cond_proj_dim: config read, written, and every tensor mapped."""
    hub_config = read_hub_config(hub_layouts, "stable-diffusion-v1-5", "unet") | {"time_cond_proj_dim": 256}
    config = UNetConfig.from_hub_config(hub_config)
    assert config == dataclasses.replace(UNetConfig.sd15(), time_cond_proj_dim=256)
    assert UNetConfig.from_hub_config(json.loads(json.dumps(config.to_hub_config()))) == config
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(hub_config)
    mapped = weights.hub_to_ours("unet", reference.state_dict())
    ours = weights.build_on_meta(UNet, config)
    assert {name: tuple(t.shape) for name, t in mapped.items()} == {
        name: tuple(t.shape) for name, t in ours.state_dict().items()
    }
    assert mapped["time_embedding.cond_proj.weight"].shape == (320, 256)
    assert "time_embedding.cond_proj.weight" in weights.ours_to_hub("unet", ours.state_dict())


def test_num_attention_heads_wins_over_attention_head_dim() -> None:
    hub_config = UNetConfig.tiny().to_hub_config() | {"attention_head_dim": [16, 32], "num_attention_heads": [4, 8]}
    assert UNetConfig.from_hub_config(hub_config).num_heads == (4, 8)


@pytest.mark.parametrize(
    ("config_cls", "change", "message"),
    [
        (UNetConfig, {"class_embed_type": "timestep"}, "class_embed_type"),
        (UNetConfig, {"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "CrossAttnDownBlock2D"),
        (UNetConfig, {"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "mirror"),
        (UNetConfig, {"only_cross_attention": [False, True]}, "only_cross_attention"),
        (UNetConfig, {"cross_attention_dim": [32, 32]}, "single int"),
        (UNetConfig, {"attention_head_dim": [3, 2]}, "divisible"),
        (VAEConfig, {"use_quant_conv": False}, "use_quant_conv"),
        (VAEConfig, {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "implements only"),
    ],
)
def test_unsupported_hub_configs_are_rejected(config_cls: type, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_cls.from_hub_config(config_cls.tiny().to_hub_config() | change)


# ---------------------------------------------------------------- full size (--runslow)


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_clip_matches_transformers(hub_layouts: Path, repo: str) -> None:
    hub_config = read_hub_config(hub_layouts, repo, "text_encoder")
    torch.manual_seed(0)
    reference = perturb_vectors(transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(hub_config)), seed=0)
    ours = ours_from(reference, "clip", CLIPTextModel, CLIPTextConfig.from_hub_config(hub_config))
    input_ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(input_ids, output_hidden_states=True)
        assert max_abs_diff(ours(input_ids), out.last_hidden_state) < TOL
        expected = reference.final_layer_norm(out.hidden_states[-2])
        assert max_abs_diff(ours(input_ids, skip_last_layers=1), expected) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_unet_matches_diffusers(hub_layouts: Path, repo: str) -> None:
    hub_config = read_hub_config(hub_layouts, repo, "unet")
    torch.manual_seed(0)
    reference = perturb_vectors(UNet2DConditionModel.from_config(hub_config), seed=0)
    config = UNetConfig.from_hub_config(hub_config)
    ours = ours_from(reference, "unet", UNet, config)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    t = torch.tensor([981, 37.5])
    with torch.no_grad():
        assert max_abs_diff(ours(x, t, context), reference(x, t, context).sample) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_vae_matches_diffusers(hub_layouts: Path, repo: str) -> None:
    hub_config = read_hub_config(hub_layouts, repo, "vae")
    torch.manual_seed(0)
    reference = perturb_vectors(ReferenceVAE.from_config(hub_config), seed=0)
    ours = ours_from(reference, "vae", AutoencoderKL, VAEConfig.from_hub_config(hub_config))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
        posterior = ours.encode(images)
        assert max_abs_diff(posterior.mean, expected.mean) < TOL
        assert max_abs_diff(posterior.logvar, expected.logvar) < TOL
        assert max_abs_diff(ours.decode(latents), reference.decode(latents).sample) < TOL
