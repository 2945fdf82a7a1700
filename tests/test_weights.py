"""The Hub -> ours weight map and the strict loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from stable_diffusion import weights
from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import AutoencoderKL, VAEConfig
from stable_diffusion.weights import WeightsMismatchError

TOL = 1e-4


def perturb_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Moves biases and norm scales off their 0 / 1 initialisation, so a mis-mapped one shows up."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def reference_clip() -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig.from_dict(CLIPTextConfig.tiny().to_hub_config())
    return perturb_vectors(transformers.CLIPTextModel(config))


@pytest.fixture(scope="module")
def reference_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return perturb_vectors(UNet2DConditionModel.from_config(UNetConfig.tiny().to_hub_config()))


@pytest.fixture(scope="module")
def reference_vae() -> ReferenceVAE:
    torch.manual_seed(0)
    return perturb_vectors(ReferenceVAE.from_config(VAEConfig.tiny().to_hub_config()))


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    return x, torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=generator)


TOKENS = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------- the strict loader


def test_mismatch_lists_missing_unexpected_and_wrong_shape_together(reference_unet) -> None:
    state = weights.hub_to_ours("unet", reference_unet.state_dict())
    del state["conv_in.bias"]
    state["conv_in.extra"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(WeightsMismatchError) as caught:
        weights.load_into(weights.build_on_meta(UNet, UNetConfig.tiny()), state)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.missing == ["conv_in.bias"]
    assert error.unexpected == ["conv_in.extra"]
    assert error.mismatched == [("conv_out.weight", (4, 32, 1, 1), (4, 32, 3, 3))]
    message = str(error)
    assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
    for text in ("conv_in.bias", "conv_in.extra", "conv_out.weight [4, 32, 1, 1] (model wants [4, 32, 3, 3])"):
        assert text in message


def test_mismatch_message_is_capped_with_counts(reference_unet) -> None:
    with pytest.raises(WeightsMismatchError) as caught:
        weights.load_into(weights.build_on_meta(UNet, UNetConfig.tiny()), {})
    error = caught.value
    total = len(UNet(UNetConfig.tiny()).state_dict())
    assert len(error.missing) == total
    assert f"{total} missing" in str(error)
    assert f"and {total - WeightsMismatchError.SHOWN} more" in str(error)


def test_a_hub_state_dict_without_renaming_is_refused(reference_unet) -> None:
    with pytest.raises(WeightsMismatchError, match=r"to_out\.0"):
        weights.load_into(UNet(UNetConfig.tiny()), reference_unet.state_dict())


def test_meta_build_then_load_materialises_every_tensor(reference_unet) -> None:
    model = weights.build_on_meta(UNet, UNetConfig.tiny())
    assert all(p.is_meta for p in model.parameters())
    state = weights.hub_to_ours("unet", reference_unet.state_dict())
    weights.load_into(model, state, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert list(model.buffers()) == []  # nothing would be left on meta
    # Same dtype and device: the tensors are assigned, not copied.
    assert model.conv_in.weight.data_ptr() == state["conv_in.weight"].data_ptr()
    assert isinstance(model.conv_in.weight, torch.nn.Parameter)
    x, t, context = unet_inputs()
    with torch.no_grad():
        assert (model(x, t, context) - reference_unet(x, t, context).sample).abs().max() < TOL


def test_load_converts_floating_tensors_to_dtype(reference_vae) -> None:
    model = weights.load_into(
        weights.build_on_meta(AutoencoderKL, VAEConfig.tiny()),
        weights.hub_to_ours("vae", reference_vae.state_dict()),
        dtype=torch.float64,
    )
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_vae.decode(latents).sample
        assert (model.decode(latents.double()).float() - expected).abs().max() < TOL


def test_hub_to_ours_does_not_copy(reference_vae) -> None:
    hub = reference_vae.state_dict()
    ours = weights.hub_to_ours("vae", hub)
    assert {t.data_ptr() for t in ours.values()} == {t.data_ptr() for t in hub.values()}


def test_unknown_network_names_the_valid_ones() -> None:
    for convert in (weights.hub_to_ours, weights.ours_to_hub):
        with pytest.raises(ValueError, match=r"\['clip', 'taesd', 'unet', 'vae'\]"):
            convert("text_encoder", {})


# ---------------------------------------------------------------- layouts


def test_clip_loads_with_and_without_text_model_prefix(reference_clip) -> None:
    bare = reference_clip.state_dict()  # transformers 5 saves CLIPTextModel like this
    prefixed = {f"text_model.{name}": t for name, t in bare.items()}  # every SD repo on the Hub
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers saved this
    with torch.no_grad():
        expected = reference_clip(TOKENS).last_hidden_state
        for state in (bare, prefixed):
            model = weights.build_on_meta(CLIPTextModel, CLIPTextConfig.tiny())
            weights.load_into(model, weights.hub_to_ours("clip", state))
            assert (model(TOKENS) - expected).abs().max() < TOL


def test_vae_loads_deprecated_attention_names(reference_vae) -> None:
    deprecated = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_state = {}
    for name, tensor in reference_vae.state_dict().items():
        for new, old in deprecated.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        old_state[name] = tensor
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old_state
    model = weights.load_into(
        weights.build_on_meta(AutoencoderKL, VAEConfig.tiny()), weights.hub_to_ours("vae", old_state)
    )
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.decode(latents) - reference_vae.decode(latents).sample).abs().max() < TOL


def test_two_layouts_mixed_in_one_state_dict_are_refused(reference_clip) -> None:
    bare = reference_clip.state_dict()
    mixed = dict(bare) | {"text_model.final_layer_norm.weight": bare["final_layer_norm.weight"]}
    with pytest.raises(ValueError, match=r"final_layer_norm\.weight"):
        weights.hub_to_ours("clip", mixed)


@pytest.mark.parametrize("network", ["clip", "unet", "vae"])
def test_ours_to_hub_inverts_hub_to_ours(network: str, reference_clip, reference_unet, reference_vae) -> None:
    reference = {"clip": reference_clip, "unet": reference_unet, "vae": reference_vae}[network]
    hub = reference.state_dict()
    if network == "clip":
        hub = {f"text_model.{name}": t for name, t in hub.items()}
    assert weights.ours_to_hub(network, weights.hub_to_ours(network, hub)).keys() == hub.keys()


def test_saved_hub_layout_loads_in_diffusers_and_transformers(
    tmp_path: Path, reference_clip, reference_unet, reference_vae
) -> None:
    """What ours_to_hub + to_hub_config write is a folder the reference libraries load, with equal outputs."""
    cases = [
        ("clip", CLIPTextModel, CLIPTextConfig.tiny(), "model.safetensors", reference_clip),
        ("unet", UNet, UNetConfig.tiny(), "diffusion_pytorch_model.safetensors", reference_unet),
        ("vae", AutoencoderKL, VAEConfig.tiny(), "diffusion_pytorch_model.safetensors", reference_vae),
    ]
    reloaded = {}
    for network, cls, config, filename, reference in cases:
        ours = weights.load_into(
            weights.build_on_meta(cls, config), weights.hub_to_ours(network, reference.state_dict())
        )
        folder = tmp_path / network
        folder.mkdir()
        hub_state = weights.ours_to_hub(network, ours.state_dict())
        save_file({name: t.contiguous() for name, t in hub_state.items()}, folder / filename)
        (folder / "config.json").write_text(json.dumps(config.to_hub_config()))
        reloaded[network] = ours

    clip = transformers.CLIPTextModel.from_pretrained(tmp_path / "clip").eval()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    vae = ReferenceVAE.from_pretrained(tmp_path / "vae").eval()
    x, t, context = unet_inputs()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (clip(TOKENS).last_hidden_state - reloaded["clip"](TOKENS)).abs().max() < TOL
        assert (unet(x, t, context).sample - reloaded["unet"](x, t, context)).abs().max() < TOL
        assert (vae.decode(latents).sample - reloaded["vae"].decode(latents)).abs().max() < TOL
