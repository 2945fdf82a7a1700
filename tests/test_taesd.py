"""The tiny autoencoder TAESD (stable_diffusion/taesd.py) and its loading (hub.py, weights.py).

Reference: diffusers' ``AutoencoderTiny`` on the same random weights, loaded into ours through the
production weight map. Weights come as diffusers writes them (``save_pretrained``), as the Hub's
cache holds them (read offline through the real ``load_tiny_vae(repo_id)`` path), as one
safetensors file, and as the original ``taesd_encoder`` / ``taesd_decoder`` files, which the tests
write by renaming the diffusers tensors the way diffusers' conversion script reads them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from test_hub import add_to_hub_cache, hub_cache  # noqa: F401 (hub_cache is a fixture)

import stable_diffusion
from stable_diffusion.hub import DEFAULT_TINY_VAE, ModelLoadError, load_tiny_vae
from stable_diffusion.taesd import TAESDConfig, TinyAutoencoder
from stable_diffusion.weights import build_on_meta, hub_to_ours, load_into, taesd_original_to_hub

# What the issue asks for: ours within 1e-5 of diffusers, relative to the size of the output.
# Ours runs its convs channels-last on a CPU (devices.conv_memory_format), diffusers NCHW: the
# sums are the same in another order, so float32 results differ by rounding amplified through ~30
# convs (measured: 2e-6 at the real shapes). In float64 that rounding is ~1e-16, so a structural
# mistake cannot hide under the float32 tolerance.
FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-12
TINY_REPO = "tiny-org/tiny-taesd"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def lively(model: AutoencoderTiny, seed: int = 0) -> AutoencoderTiny:
    """Random weights that keep activations of order 1 through the whole network.

    With diffusers' default initialisation the decoder's output is -1 ± 0.03 (each conv shrinks
    its input), so a relative error would measure mostly the constant. Conv weights get
    N(0, 1/fan_in), biases N(0, 0.05²).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            std = 1 / param[0].numel() ** 0.5 if param.ndim == 4 else 0.05
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


def ours_from(reference: AutoencoderTiny, dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """Ours, built from the reference's own config and filled through the production weight map."""
    model = build_on_meta(TinyAutoencoder, TAESDConfig.from_hub_config(dict(reference.config)))
    return load_into(model, hub_to_ours("taesd", reference.state_dict()), dtype=dtype, device="cpu").eval()


def inputs(latent_shape: tuple[int, ...], factor: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of std 2 (some beyond the decoder's soft clamp at ±3) and images in [-1, 1] ``factor`` times larger."""
    generator = torch.Generator().manual_seed(1)
    batch, _, height, width = latent_shape
    latents = 2 * torch.randn(latent_shape, generator=generator, dtype=dtype)
    images = 2 * torch.rand(batch, 3, factor * height, factor * width, generator=generator, dtype=dtype) - 1
    return latents, images


def assert_matches(ours: TinyAutoencoder, reference: AutoencoderTiny, latent_shape: tuple[int, ...], *, dtype, tol):
    latents, images = inputs(latent_shape, ours.config.downsampling_factor, dtype)
    with torch.no_grad():
        decoded, expected_images = ours.decode(latents), reference.decode(latents).sample
        encoded, expected_latents = ours.encode(images), reference.encode(images).latents
    assert decoded.shape == images.shape and encoded.shape == latents.shape
    assert relative_error(decoded, expected_images) < tol
    assert relative_error(encoded, expected_latents) < tol


@pytest.fixture(scope="module")
def sd_reference() -> AutoencoderTiny:
    """madebyollin/taesd's shapes: diffusers' AutoencoderTiny with its default config."""
    return lively(AutoencoderTiny())


@pytest.fixture(scope="module")
def tiny_reference() -> AutoencoderTiny:
    return lively(AutoencoderTiny.from_config(TAESDConfig.tiny().to_hub_config()))


@pytest.fixture(scope="module")
def tiny_taesd_folder(tmp_path_factory: pytest.TempPathFactory, tiny_reference: AutoencoderTiny) -> Path:
    folder = tmp_path_factory.mktemp("tiny-taesd")
    tiny_reference.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- network
def test_real_shapes_match_diffusers(sd_reference: AutoencoderTiny) -> None:
    ours = ours_from(sd_reference)
    assert ours.config == TAESDConfig.sd()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in sd_reference.parameters())
    assert_matches(ours, sd_reference, (1, 4, 16, 16), dtype=torch.float32, tol=FLOAT32_TOLERANCE)


@pytest.mark.slow
def test_real_shapes_match_diffusers_at_512px(sd_reference: AutoencoderTiny) -> None:
    assert_matches(ours_from(sd_reference), sd_reference, (1, 4, 64, 64), dtype=torch.float32, tol=FLOAT32_TOLERANCE)


def test_tiny_config_matches_diffusers_in_float64(tiny_reference: AutoencoderTiny) -> None:
    """A batch of two non-square pictures; float64 leaves no room for a wrong layer."""
    ours = ours_from(tiny_reference.double(), torch.float64)
    try:
        assert_matches(ours, tiny_reference, (2, 4, 6, 10), dtype=torch.float64, tol=FLOAT64_TOLERANCE)
    finally:
        tiny_reference.float()


def test_config_translation() -> None:
    assert TAESDConfig.from_hub_config(dict(AutoencoderTiny().config)) == TAESDConfig.sd()
    for preset in (TAESDConfig.sd(), TAESDConfig.tiny()):
        reread = AutoencoderTiny.from_config(preset.to_hub_config()).config
        assert TAESDConfig.from_hub_config(dict(reread)) == preset
    assert TAESDConfig.sd().downsampling_factor == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scaling_factor": 1.5305, "shift_factor": 0.0609}, "scaling_factor=1.5305"),  # taesd3's config
        ({"act_fn": "silu"}, "act_fn='silu'"),
        ({"_class_name": "AutoencoderKL"}, "AutoencoderKL, not of an AutoencoderTiny"),
        ({"encoder_block_out_channels": [32, 64, 64, 64]}, "one width"),
        ({"num_decoder_blocks": [3, 3, 1]}, "3 decoder levels"),
    ],
)
def test_unsupported_configs_are_refused(change: dict, message: str) -> None:
    hub_config = {**TAESDConfig.sd().to_hub_config(), **change}
    if "num_decoder_blocks" in change:
        hub_config["decoder_block_out_channels"] = [64] * 3
    with pytest.raises(ValueError, match=message):
        TAESDConfig.from_hub_config(hub_config)


# ------------------------------------------------------------------------------------- loading
def original_files(reference: AutoencoderTiny, folder: Path) -> Path:
    """Writes taesd_encoder / taesd_decoder.safetensors as madebyollin/taesd ships them: each half a
    bare nn.Sequential, the decoder's shifted by the soft clamp at index 0."""
    folder.mkdir(parents=True, exist_ok=True)
    halves: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for name, tensor in reference.state_dict().items():
        half, layers, index, leaf = name.split(".", 3)
        assert layers == "layers"
        halves[half][f"{int(index) + (half == 'decoder')}.{leaf}"] = tensor.contiguous()
    for half, state in halves.items():
        save_file(state, folder / f"taesd_{half}.safetensors")
    return folder


def test_load_diffusers_folder(tiny_taesd_folder: Path, tiny_reference: AutoencoderTiny) -> None:
    ours = load_tiny_vae(tiny_taesd_folder, "cpu", torch.float32)
    assert ours.config == TAESDConfig.tiny()
    assert_matches(ours, tiny_reference, (1, 4, 4, 4), dtype=torch.float32, tol=FLOAT32_TOLERANCE)
    assert {p.dtype for p in load_tiny_vae(tiny_taesd_folder, "cpu", torch.bfloat16).parameters()} == {torch.bfloat16}


def test_load_repo_id_from_the_cache_offline(hub_cache: Path, tiny_taesd_folder: Path, tiny_reference) -> None:
    add_to_hub_cache(hub_cache, TINY_REPO, tiny_taesd_folder)
    ours = load_tiny_vae(TINY_REPO, "cpu", torch.float32)
    assert_matches(ours, tiny_reference, (1, 4, 4, 4), dtype=torch.float32, tol=FLOAT32_TOLERANCE)


def test_load_original_files_and_single_file(tmp_path: Path, sd_reference: AutoencoderTiny) -> None:
    folder = original_files(sd_reference, tmp_path / "original")
    from_original = load_tiny_vae(folder, "cpu", torch.float32)
    assert_matches(from_original, sd_reference, (1, 4, 4, 4), dtype=torch.float32, tol=FLOAT32_TOLERANCE)
    single = tmp_path / "taesd.safetensors"
    save_file({name: t.contiguous() for name, t in sd_reference.state_dict().items()}, single)
    from_single = load_tiny_vae(single, "cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(from_single.parameters(), from_original.parameters(), strict=True))


def test_original_layout_names() -> None:
    """The decoder's Sequential index i + 1 is diffusers' decoder.layers.i; the encoder's are equal."""
    weight = torch.zeros(1)
    hub = taesd_original_to_hub({"encoder": {"0.weight": weight}, "decoder": {"1.bias": weight, "3.conv.4.weight": weight}})
    assert sorted(hub) == ["decoder.layers.0.bias", "decoder.layers.2.conv.4.weight", "encoder.layers.0.weight"]
    with pytest.raises(ValueError, match="not a tensor of the original TAESD decoder"):
        taesd_original_to_hub({"decoder": {"decoder.layers.0.weight": weight}})


def test_pipeline_load_attaches_the_tiny_vae(tmp_path: Path, tiny_sd1_folder: Path, tiny_taesd_folder: Path) -> None:
    """The tiny SD pipeline's VAE downsamples 2×, so its TAESD has two levels."""
    two_levels = TAESDConfig(encoder_channels=8, decoder_channels=8, num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    reference = lively(AutoencoderTiny.from_config(two_levels.to_hub_config()))
    reference.save_pretrained(tmp_path / "taesd")
    pipe = stable_diffusion.load(tiny_sd1_folder, device="cpu", dtype=torch.float32, tiny_vae=tmp_path / "taesd")
    assert isinstance(pipe.tiny_vae, TinyAutoencoder) and pipe.tiny_vae.config == two_levels
    assert_matches(pipe.tiny_vae, reference, (1, 4, 8, 8), dtype=torch.float32, tol=FLOAT32_TOLERANCE)
    assert pipe.preview_decoder == "tiny"  # live previews are tiny decodes
    x0 = torch.randn(1, 4, 8, 8)
    assert np.array_equal(np.asarray(pipe.preview(x0)[0]), np.asarray(pipe.decode(x0, decoder="tiny")[0]))
    assert stable_diffusion.load(tiny_sd1_folder, device="cpu", dtype=torch.float32).tiny_vae is None
    # A TAESD that downsamples 8× (as SD's does) does not fit this VAE.
    with pytest.raises(ModelLoadError, match=r"does not fit .* 4 latent channels at 1/8 .* 4 at 1/2"):
        stable_diffusion.load(tiny_sd1_folder, device="cpu", dtype=torch.float32, tiny_vae=tiny_taesd_folder)


# -------------------------------------------------------------------------------------- errors
def test_missing_sources(tmp_path: Path, hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="no file or folder at .*madebyollin/taesd"):
        load_tiny_vae(tmp_path / "nowhere", "cpu", torch.float32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "taesd_encoder.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"holds no tiny autoencoder: it needs config\.json .* it has taesd_enc"):
        load_tiny_vae(tmp_path / "empty", "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match=f"Cannot load '{DEFAULT_TINY_VAE}'.*HF_HUB_OFFLINE=1"):
        load_tiny_vae(DEFAULT_TINY_VAE, "cpu", torch.float32)


def test_cached_repo_without_the_weights(hub_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    add_to_hub_cache(hub_cache, TINY_REPO, tmp_path / "partial")
    with pytest.raises(ModelLoadError, match="lacks diffusion_pytorch_model.safetensors.*HF_HUB_OFFLINE=1"):
        load_tiny_vae(TINY_REPO, "cpu", torch.float32)


def test_repo_without_the_weights_online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a tiny autoencoder .* missing diffusion_pytorch_model.safetensors"):
        load_tiny_vae(TINY_REPO, "cpu", torch.float32)


def test_corrupt_and_mismatched_files(tmp_path: Path, tiny_taesd_folder: Path, tiny_sd1_folder: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_taesd_folder, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_tiny_vae(truncated, "cpu", torch.float32)
    # The tiny weights read with the SD config (a single file): every mismatch is listed.
    with pytest.raises(ModelLoadError, match=r"(?s)taesd weights .* do not fit.*0\.weight \[8, 4, 3, 3\] \(model wants \[64"):
        load_tiny_vae(tiny_taesd_folder / "diffusion_pytorch_model.safetensors", "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match="AutoencoderKL, not of an AutoencoderTiny"):
        load_tiny_vae(tiny_sd1_folder / "vae", "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match=r"\.safetensors file of AutoencoderTiny weights"):
        load_tiny_vae(tiny_sd1_folder / "model_index.json", "cpu", torch.float32)
    other = tmp_path / "other"
    other.mkdir()
    for half in ("encoder", "decoder"):
        save_file({"weight": torch.zeros(2)}, other / f"taesd_{half}.safetensors")
    with pytest.raises(ModelLoadError, match="not the original TAESD's: 'weight'"):
        load_tiny_vae(other, "cpu", torch.float32)


def test_pipeline_load_checks_the_tiny_vae_first(tmp_path: Path) -> None:
    """A wrong tiny_vae is reported before the model is even looked for."""
    with pytest.raises(ModelLoadError, match="tiny autoencoder folder"):
        stable_diffusion.load(tmp_path / "no-model", device="cpu", dtype=torch.float32, tiny_vae=tmp_path / "no-taesd")
