"""LoRA files (stable_diffusion/lora.py) on tiny random SD 1.x- and 2.x-shaped models.

The tests write random LoRA files in each key family, with linear, 1×1-conv and 3×3-conv parts in
the UNet and text-encoder parts, and compare our UNet's and text encoder's outputs after merging with

* diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=...)`` where diffusers reads the file;
* the reference networks patched by hand, W + scale · alpha / rank · up @ down, where it does not
  (kohya files with LDM module paths, and per-layer alphas, which diffusers mis-assigns).

Parity is a relative error max|ours - reference| / max|reference| ≤ 1e-5 in float32: both sides
compute the same sums up to their order. Unloading must restore every weight bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny_reference_pipeline
from safetensors.torch import save_file
from test_hub import add_to_hub_cache, hub_cache  # noqa: F401 (a fixture)
from torch import nn

from stable_diffusion import load
from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
from stable_diffusion.hub import ModelLoadError
from stable_diffusion.lora import LoraError, LoraStack, available_loras, find_lora
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.weights import build_on_meta

KINDS = ("sd1", "sd2")
RANK = 4
SCALE = 0.7
TOL = 1e-5


@dataclass(frozen=True)
class Factors:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


LoraSpec = dict[tuple[str, str], Factors]  # (network, module path in the reference network) -> factors


def written(network: str, path: str) -> str:
    """The module path LoRA files write: transformers 5's CLIPTextModel has no ``text_model.`` level,
    the CLIPTextModel of every SD repo and of the LoRA trainers has it."""
    return path if network == "unet" else f"text_model.{path}"


def random_lora(reference, *, seed: int, alpha=lambda weight: 2.0 if weight.ndim == 2 else 1.0) -> LoraSpec:
    """Factors for every Linear and Conv2d layer of the reference UNet and text encoder.

    The default alphas are a kohya LoCon file's: ``network_alpha`` for the linear layers and
    ``conv_alpha`` for the convolutions (1×1 ones included).
    """
    generator = torch.Generator().manual_seed(seed)
    spec = {}
    for network, model in (("unet", reference.unet), ("text_encoder", reference.text_encoder)):
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                weight = module.weight
                down = 0.15 * torch.randn(RANK, *weight.shape[1:], generator=generator)
                up = 0.15 * torch.randn(weight.shape[0], RANK, *[1] * (weight.ndim - 2), generator=generator)
                spec[network, path] = Factors(down, up, alpha(weight))
    assert {tuple(f.down.shape[2:]) for f in spec.values()} == {(), (1, 1), (3, 3)}  # linear, 1×1 and 3×3 convs
    return spec


def kohya_keys(spec: LoraSpec, *, unet_path=lambda path: path) -> dict[str, torch.Tensor]:
    """kohya's underscore-joined names; ``unet_path`` maps a Hub UNet path to the one to write."""
    keys = {}
    for (network, path), f in spec.items():
        name = "lora_unet_" + unet_path(path) if network == "unet" else "lora_te_" + written(network, path)
        name = name.replace(".", "_")
        keys |= {
            f"{name}.lora_down.weight": f.down,
            f"{name}.lora_up.weight": f.up,
            f"{name}.alpha": torch.tensor(f.alpha),
        }
    return keys


def peft_keys(spec: LoraSpec) -> dict[str, torch.Tensor]:
    keys = {}
    for (network, path), f in spec.items():
        name = f"{network}.{written(network, path)}"
        keys |= {f"{name}.lora_A.weight": f.down, f"{name}.lora_B.weight": f.up}
    return keys


def legacy_diffusers_keys(spec: LoraSpec) -> dict[str, torch.Tensor]:
    """diffusers' spellings before PEFT: attention processors (``attn1.processor.to_q_lora``), the
    LoRACompatible layers (``.lora.down``) and the text encoder's ``lora_linear_layer``."""
    keys = {}
    for (network, path), f in spec.items():
        parent, _, leaf = written(network, path).removesuffix(".0").rpartition(".")  # to_out.0 -> to_out
        if network == "unet" and leaf in ("to_q", "to_k", "to_v", "to_out"):
            name = f"unet.{parent}.processor.{leaf}_lora"
        elif network == "unet":
            name = f"unet.{path}.lora"
        elif leaf.endswith("_proj"):  # the text encoder's q_proj ... out_proj -> to_q_lora ... to_out_lora
            name = f"text_encoder.{parent}.to_{leaf.removesuffix('_proj')}_lora"
        else:
            name = f"text_encoder.{written(network, path)}.lora_linear_layer"
        keys |= {f"{name}.down.weight": f.down, f"{name}.up.weight": f.up}
    return keys


def write(folder: Path, name: str, keys: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in keys.items()}, path, metadata=metadata)
    return path


def patch_by_hand(reference, spec: LoraSpec, scale: float, *, text_encoder_scale: float | None = None) -> None:
    networks = {"unet": reference.unet, "text_encoder": reference.text_encoder}
    scales = {"unet": scale, "text_encoder": scale if text_encoder_scale is None else text_encoder_scale}
    with torch.no_grad():
        for (network, path), f in spec.items():
            weight = networks[network].get_submodule(path).weight
            product = f.up.flatten(1) @ f.down.flatten(1)
            weight += scales[network] * f.alpha / RANK * product.reshape(weight.shape)


# ----------------------------------------------------------------------------- comparing outputs
def inputs():
    generator = torch.Generator().manual_seed(7)
    return {
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "t": torch.tensor([999.0, 37.0]),
        "context": torch.randn(2, 77, 32, generator=generator),
        "ids": torch.randint(0, 49408, (2, 77), generator=generator),
    }


@torch.no_grad()
def our_outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    i = inputs()
    return pipe.unet(i["x"], i["t"], i["context"]), pipe.text_encoder(i["ids"])


@torch.no_grad()
def reference_outputs(reference) -> tuple[torch.Tensor, torch.Tensor]:
    i = inputs()
    unet = reference.unet(i["x"], i["t"], encoder_hidden_states=i["context"]).sample
    return unet, reference.text_encoder(i["ids"]).last_hidden_state


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_outputs_match(pipe, reference) -> None:
    for ours, expected in zip(our_outputs(pipe), reference_outputs(reference), strict=True):
        assert relative_error(ours, expected) <= TOL


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{network}.{name}": p.detach().clone()
        for network, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
        for name, p in model.named_parameters()
    }


def assert_unchanged(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny reference pipelines saved in the Hub layout, for our ``load``."""
    saved = {}
    for kind in KINDS:
        saved[kind] = tmp_path_factory.mktemp(f"tiny-{kind}")
        build_tiny_reference_pipeline(kind).save_pretrained(saved[kind])
    return saved


def ours(folders: dict[str, Path], kind: str):
    pipe = load(folders[kind], device="cpu", dtype=torch.float32)
    return pipe, LoraStack(text_encoder=pipe.text_encoder, unet=pipe.unet)


# openaimodel.ResBlock's layers: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, Linear),
# out_layers = (GroupNorm, SiLU, Dropout, conv)
LDM_RESNET = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_path_of(config):
    """Hub UNet module path -> the original LDM UNet's, written out here from openaimodel.UNetModel
    (independently of the package's single-file rules): its input blocks are one sequence of
    (resnet, transformer) pairs and downsamplers, its output blocks one sequence of
    (resnet, transformer, upsampler) triples; diffusers nests both per level."""
    per_level, attends = config["layers_per_block"], [t.startswith("CrossAttn") for t in config["up_block_types"]]
    blocks = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    block = 1
    for level in range(len(config["block_out_channels"])):
        for i in range(per_level):
            blocks |= {f"down_blocks.{level}.resnets.{i}": f"input_blocks.{block}.0"}
            blocks |= {f"down_blocks.{level}.attentions.{i}": f"input_blocks.{block}.1"}
            block += 1
        blocks |= {f"down_blocks.{level}.downsamplers.0.conv": f"input_blocks.{block}.0.op"}  # none on the last level
        block += 1
        # diffusers' up levels and LDM's output blocks both start at the lowest resolution
        for i in range(per_level + 1):
            out = level * (per_level + 1) + i
            blocks |= {f"up_blocks.{level}.resnets.{i}": f"output_blocks.{out}.0"}
            blocks |= {f"up_blocks.{level}.attentions.{i}": f"output_blocks.{out}.1"}
        blocks |= {f"up_blocks.{level}.upsamplers.0.conv": f"output_blocks.{out}.{2 if attends[level] else 1}.conv"}

    def ldm_path(path: str) -> str:
        hub_block = max((b for b in blocks if path == b or path.startswith(b + ".")), key=len)
        rest = path.removeprefix(hub_block).removeprefix(".")
        rest = LDM_RESNET[rest] if ".resnets." in hub_block else rest
        return f"{blocks[hub_block]}.{rest}" if rest else blocks[hub_block]

    return ldm_path


# ---------------------------------------------------------------------------- each key family
@pytest.mark.parametrize("kind", KINDS)
def test_kohya_diffusers_paths_match_diffusers(folders, tmp_path: Path, kind: str) -> None:
    reference = build_tiny_reference_pipeline(kind)
    spec = random_lora(reference, seed=1)
    file = write(tmp_path, "kohya", kohya_keys(spec))
    pipe, stack = ours(folders, kind)
    before, outputs_before = snapshot(pipe), our_outputs(pipe)

    assert stack.load(file, SCALE) == "kohya" and stack.names == ["kohya"]
    reference.load_lora_weights(str(file))
    reference.fuse_lora(lora_scale=SCALE)
    assert_outputs_match(pipe, reference)
    assert not any(torch.allclose(a, b, rtol=0.01) for a, b in zip(our_outputs(pipe), outputs_before, strict=True))

    stack.unload()
    assert stack.names == []
    assert_unchanged(pipe, before)
    assert all(torch.equal(a, b) for a, b in zip(our_outputs(pipe), outputs_before, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_keys_with_diffusers_metadata_match_diffusers(folders, tmp_path: Path, kind: str) -> None:
    """diffusers writes PEFT's lora_alpha (and per-layer alpha_pattern) in the file's metadata."""
    reference = build_tiny_reference_pipeline(kind)
    spec = random_lora(reference, seed=2)
    patterned = "down_blocks.0.attentions.0.proj_in"
    metadata = {
        "unet.r": RANK,
        "unet.lora_alpha": 8,
        "unet.alpha_pattern": {patterned: 3},
        "unet.target_modules": sorted(path for network, path in spec if network == "unet"),
        "text_encoder.r": RANK,
        "text_encoder.lora_alpha": 2,
        "text_encoder.target_modules": sorted(path for network, path in spec if network == "text_encoder"),
    }
    file = write(tmp_path, "peft", peft_keys(spec), {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    pipe, stack = ours(folders, kind)

    stack.load(file, SCALE)
    reference.load_lora_weights(str(file))
    reference.fuse_lora(lora_scale=SCALE)
    assert_outputs_match(pipe, reference)
    # and the alphas are the ones the metadata gives
    patch_by_hand(
        hand := build_tiny_reference_pipeline(kind),
        {
            key: Factors(f.down, f.up, 3 if key[1] == patterned else 8 if key[0] == "unet" else 2)
            for key, f in spec.items()
        },
        SCALE,
    )
    assert_outputs_match(pipe, hand)


def test_legacy_diffusers_keys_match_diffusers(folders, tmp_path: Path) -> None:
    reference = build_tiny_reference_pipeline("sd1")
    spec = random_lora(reference, seed=3, alpha=lambda weight: RANK)  # these files have no alphas
    keys = legacy_diffusers_keys(spec)
    assert any(".processor.to_out_lora." in k for k in keys) and any("self_attn.to_q_lora" in k for k in keys)
    file = write(tmp_path, "legacy", keys)
    pipe, stack = ours(folders, "sd1")

    stack.load(file, SCALE)
    reference.load_lora_weights(str(file))
    reference.fuse_lora(lora_scale=SCALE)
    assert_outputs_match(pipe, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_ldm_paths_match_weights_patched_by_hand(folders, tmp_path: Path, kind: str) -> None:
    reference = build_tiny_reference_pipeline(kind)
    spec = random_lora(reference, seed=4)
    keys = kohya_keys(spec, unet_path=ldm_path_of(reference.unet.config))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_output_blocks_1_1_conv.lora_down.weight" in keys  # the upsampler's 3×3 conv
    file = write(tmp_path, "ldm", keys)
    pipe, stack = ours(folders, kind)
    before = snapshot(pipe)

    assert stack.read(file).families == ("kohya (Hub paths)", "kohya (LDM paths)")  # Hub: the text encoder
    stack.load(file, SCALE)
    patch_by_hand(reference, spec, SCALE)
    assert_outputs_match(pipe, reference)
    stack.unload("ldm")
    assert_unchanged(pipe, before)


def test_per_layer_alphas_match_weights_patched_by_hand(folders, tmp_path: Path) -> None:
    """Resized kohya LoRAs have an alpha per layer; each applies to its own layer (A1111's reading)."""
    reference = build_tiny_reference_pipeline("sd1")
    generator = torch.Generator().manual_seed(5)
    spec = random_lora(reference, seed=5, alpha=lambda weight: 0.5 + 8 * torch.rand(1, generator=generator).item())
    file = write(tmp_path, "resized", kohya_keys(spec))
    pipe, stack = ours(folders, "sd1")

    stack.load(file, SCALE)
    patch_by_hand(reference, spec, SCALE)
    assert_outputs_match(pipe, reference)


def test_pickled_lora_needs_allow_pickle(folders, tmp_path: Path) -> None:
    reference = build_tiny_reference_pipeline("sd1")
    keys = kohya_keys(random_lora(reference, seed=6))
    pickled, safe = tmp_path / "pickled.pt", write(tmp_path, "safe", keys)
    torch.save(keys, pickled)
    pipe, stack = ours(folders, "sd1")
    before = snapshot(pipe)

    with pytest.raises(ModelLoadError, match="pickle.*allow_pickle=True"):
        stack.load(pickled)
    assert_unchanged(pipe, before)
    stack.load(pickled, SCALE, allow_pickle=True)
    from_pickle = snapshot(pipe)
    stack.unload()
    stack.load(safe, SCALE)
    assert_unchanged(pipe, from_pickle)


# ---------------------------------------------------------------------- stacking and unloading
def test_stacked_loras_add_and_unload_one_at_a_time_exactly(folders, tmp_path: Path) -> None:
    reference = build_tiny_reference_pipeline("sd1")
    first, second = random_lora(reference, seed=8), random_lora(reference, seed=9)
    second = {key: f for key, f in second.items() if "attn" in key[1] or "self_attn" in key[1]}  # overlapping parts
    first_file, second_file = write(tmp_path, "first", kohya_keys(first)), write(tmp_path, "second", peft_keys(second))
    pipe, stack = ours(folders, "sd1")
    original = snapshot(pipe)
    only_second, only_second_stack = ours(folders, "sd1")
    only_second_stack.load(second_file, -0.4)

    stack.load(first_file, SCALE)
    stack.load(second_file, -0.4, name="style")
    assert stack.names == ["first", "style"]
    patch_by_hand(reference, first, SCALE)
    patch_by_hand(reference, {key: Factors(f.down, f.up, RANK) for key, f in second.items()}, -0.4)
    assert_outputs_match(pipe, reference)

    stack.unload("first")  # as if it had never been loaded
    assert_unchanged(pipe, snapshot(only_second))
    with pytest.raises(LoraError, match="no LoRA named 'first'.*loaded: style"):
        stack.unload("first")
    stack.unload("style")
    assert_unchanged(pipe, original)


def test_same_name_twice_is_refused(folders, tmp_path: Path) -> None:
    file = write(tmp_path, "a", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=10)))
    pipe, stack = ours(folders, "sd1")
    stack.load(file)
    changed = snapshot(pipe)
    with pytest.raises(LoraError, match="'a' is loaded already"):
        stack.load(file)
    assert_unchanged(pipe, changed)
    stack.load(file, name="a again")
    assert stack.names == ["a", "a again"]


# ------------------------------------------------------------------------------------- refusals
def test_lora_for_another_base_model_is_refused_and_changes_nothing(folders, tmp_path: Path) -> None:
    """The tiny SD 2.x model projects into its transformers with linear layers, SD 1.x with 1×1 convs."""
    file = write(tmp_path, "for-sd1", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=11)))
    pipe, stack = ours(folders, "sd2")
    before = snapshot(pipe)
    shapes = r"nothing was applied(.|\n)*wrong shapes.*proj_in: the LoRA changes a \[32, 32, 1, 1\] weight"
    with pytest.raises(LoraError, match=shapes):
        stack.load(file)
    assert_unchanged(pipe, before)
    assert stack.names == []


def full_size_stack(unet: UNetConfig, clip: CLIPTextConfig) -> LoraStack:
    """Networks at full size on the meta device: shapes without memory, enough to resolve a LoRA."""
    return LoraStack(text_encoder=build_on_meta(CLIPTextModel, clip), unet=build_on_meta(UNet, unet))


def test_sd15_lora_on_sd21_names_both_base_models(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(12)
    path = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    file = write(
        tmp_path,
        "sd15",
        {
            f"{path}.lora_down.weight": torch.randn(RANK, 768, generator=generator),
            f"{path}.lora_up.weight": torch.randn(320, RANK, generator=generator),
        },
    )
    assert full_size_stack(UNetConfig.sd15(), CLIPTextConfig.sd15()).read(file).layers  # fits SD 1.5
    both = r"768-wide text states \(SD 1.x\), this model's read 1024-wide ones \(SD 2.x\)"
    with pytest.raises(LoraError, match=both):
        full_size_stack(UNetConfig.sd21(), CLIPTextConfig.sd21()).read(file)


def test_ldm_paths_at_sd15_shapes(tmp_path: Path) -> None:
    """Names from real kohya SD 1.5 files, LDM paths -> our modules, written out by hand."""
    attention = "attentions.{}.transformer_blocks.0.{}"
    expected = {
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks_3_0_op": "down_blocks.0.downsample.conv",
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1." + attention.format(0, "attn1.to_q"),
        "input_blocks_8_1_proj_in": "down_blocks.2.attentions.1.proj_in",
        "middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block." + attention.format(0, "ff.proj_in"),
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_2_1_conv": "up_blocks.0.upsample.conv",
        "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
        "output_blocks_5_2_conv": "up_blocks.1.upsample.conv",
        "output_blocks_11_1_transformer_blocks_0_attn2_to_out_0": "up_blocks.3." + attention.format(2, "attn2.to_out"),
    }
    stack = full_size_stack(UNetConfig.sd15(), CLIPTextConfig.sd15())
    keys = {}
    for ldm, module in expected.items():
        shape = stack._weight(("unet", module)).shape
        keys[f"lora_unet_{ldm}.lora_down.weight"] = torch.zeros(1, *shape[1:])
        keys[f"lora_unet_{ldm}.lora_up.weight"] = torch.zeros(shape[0], 1, *[1] * (len(shape) - 2))
    lora = stack.read(write(tmp_path, "sd15-ldm", keys))
    assert sorted(lora.layers) == sorted(("unet", module) for module in expected.values())


UNKNOWN_LAYER = "lora_unet_down_blocks_9_resnets_0_conv1"
NOT_PLAIN_LORA = {
    "sdxl": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [1, 32]}, "SDXL"),
    "loha": ({"lora_unet_conv_in.hada_w1_a": [1, 4]}, "LyCORIS LoHa"),
    "dora": ({"lora_unet_conv_in.lora_down.weight": [1, 4], "lora_unet_conv_in.dora_scale": [1]}, "DoRA"),
    "checkpoint": ({"model.diffusion_model.conv_in.weight": [1]}, "holds no LoRA tensors.*full checkpoint"),
    "no up": ({"lora_unet_conv_in.lora_down.weight": [1, 4, 3, 3]}, r"incomplete \(1\): unet conv_in \(has down\)"),
    "rank": (
        {"lora_unet_conv_in.lora_down.weight": [2, 4, 3, 3], "lora_unet_conv_in.lora_up.weight": [32, 1, 1, 1]},
        r"incomplete \(1\): unet conv_in \(down \[2, 4, 3, 3\] and up \[32, 1, 1, 1\] do not multiply\)",
    ),
    "unknown layer": (
        {f"{UNKNOWN_LAYER}.lora_down.weight": [1, 4], f"{UNKNOWN_LAYER}.lora_up.weight": [4, 1]},
        "layers this model lacks \\(1\\): unet down_blocks_9_resnets_0_conv1",
    ),
}


@pytest.mark.parametrize(("shapes", "message"), NOT_PLAIN_LORA.values(), ids=NOT_PLAIN_LORA.keys())
def test_files_that_are_not_plain_lora_are_refused(folders, tmp_path: Path, shapes, message: str) -> None:
    pipe, stack = ours(folders, "sd1")
    before = snapshot(pipe)
    with pytest.raises(LoraError, match=message):
        stack.load(write(tmp_path, "bad", {name: torch.zeros(shape) for name, shape in shapes.items()}))
    assert_unchanged(pipe, before)


def test_corrupt_file_gets_a_clear_error(folders, tmp_path: Path) -> None:
    good = write(tmp_path, "good", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=13)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    pipe, stack = ours(folders, "sd1")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file.*truncated"):
        stack.load(truncated)
    assert stack.names == []


# ---------------------------------------------------------------------------- sources and tags
def test_sources_folder_and_hub_repo(folders, tmp_path: Path, hub_cache: Path) -> None:  # noqa: F811
    spec = random_lora(build_tiny_reference_pipeline("sd1"), seed=14)
    repo = tmp_path / "repo"
    repo.mkdir()
    write(repo, "pytorch_lora_weights", peft_keys(spec))
    write(repo, "other", kohya_keys(spec))
    add_to_hub_cache(hub_cache, "tiny-org/tiny-lora", repo)
    pipe, stack = ours(folders, "sd1")

    assert stack.load(repo) == "repo"  # a folder: diffusers' file name first
    from_folder = snapshot(pipe)
    stack.unload()
    assert stack.load("tiny-org/tiny-lora") == "tiny-lora"
    assert_unchanged(pipe, from_folder)
    stack.unload()
    stack.load("tiny-org/tiny-lora", weight_name="other.safetensors", name="kohya")  # alphas differ from PEFT's
    assert not all(torch.equal(p, from_folder[name]) for name, p in snapshot(pipe).items())
    with pytest.raises(ModelLoadError, match="not \\(completely\\) in the local Hugging Face cache"):
        stack.load("tiny-org/tiny-lora", weight_name="missing.safetensors")
    with pytest.raises(LoraError, match="no LoRA file or folder at"):
        stack.load(tmp_path / "missing.safetensors")


def test_unknown_name_lists_the_available_ones(tmp_path: Path) -> None:
    (tmp_path / "styles").mkdir()
    for name in ("styles/ghibli.safetensors", "film.safetensors", "film.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert available_loras([tmp_path, tmp_path / "missing"]) == {
        "film": tmp_path / "film.safetensors",
        "ghibli": tmp_path / "styles" / "ghibli.safetensors",
    }
    assert find_lora("ghibli", [tmp_path]) == tmp_path / "styles" / "ghibli.safetensors"
    with pytest.raises(LoraError, match="unknown LoRA 'anime'.*Available: film, ghibli"):
        find_lora("anime", [tmp_path])


def versions(pipe) -> list[int]:
    """Every weight's version counter: an in-place write (a merge, a restore) advances it."""
    return [p._version for model in (pipe.unet, pipe.text_encoder) for p in model.parameters()]


def test_applied_keeps_a_request_merged_until_other_tags(folders, tmp_path: Path) -> None:
    reference = build_tiny_reference_pipeline("sd1")
    persistent, tagged, rewritten = (random_lora(reference, seed=seed) for seed in (15, 16, 17))
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write(lora_dir, "tagged", kohya_keys(tagged))
    pipe, stack = ours(folders, "sd1")
    stack.load(write(tmp_path, "persistent", kohya_keys(persistent)), SCALE)
    before = snapshot(pipe)
    patch_by_hand(reference, persistent, SCALE)

    # what prompts.extract_lora_tags makes of "<lora:tagged:0.5:1.2>": text encoder 0.5, UNet 1.2
    tags = [SimpleNamespace(name="tagged", text_encoder_weight=0.5, unet_weight=1.2)]
    with stack.applied(tags, lora_dirs=[lora_dir]):
        patch_by_hand(reference, tagged, 1.2, text_encoder_scale=0.5)
        assert_outputs_match(pipe, reference)
        assert stack.names == ["persistent"]  # a request's own are not "loaded"
    merged, written_once = snapshot(pipe), versions(pipe)

    # The same tags again: nothing is merged (no weight written).
    with stack.applied(tags, lora_dirs=[lora_dir]):
        assert_unchanged(pipe, merged)
    assert versions(pipe) == written_once
    with pytest.raises(RuntimeError, match="generation failed"), stack.applied(tags, lora_dirs=[lora_dir]):
        raise RuntimeError("generation failed")
    assert_unchanged(pipe, merged)

    # A request without tags swaps them out, exactly; an unknown tag changes nothing.
    with stack.applied([], lora_dirs=[lora_dir]):
        assert_unchanged(pipe, before)
    missing = SimpleNamespace(name="missing", text_encoder_weight=1.0, unet_weight=1.0)
    with pytest.raises(LoraError, match="unknown LoRA 'missing'.*Available: tagged"):
        with stack.applied([*tags, missing], lora_dirs=[lora_dir]):
            pass
    assert_unchanged(pipe, before)

    # Other weights, or the file rewritten on disk, are other tags; unload() takes a request's out too.
    half = [SimpleNamespace(name="tagged", text_encoder_weight=0.5, unet_weight=0.6)]
    with stack.applied(half, lora_dirs=[lora_dir]):
        reference = build_tiny_reference_pipeline("sd1")
        patch_by_hand(reference, persistent, SCALE)
        patch_by_hand(reference, tagged, 0.6, text_encoder_scale=0.5)
        assert_outputs_match(pipe, reference)
    time.sleep(0.01)  # a new modification time, even on coarse clocks
    write(lora_dir, "tagged", kohya_keys(rewritten))
    with stack.applied(half, lora_dirs=[lora_dir]):
        reference = build_tiny_reference_pipeline("sd1")
        patch_by_hand(reference, persistent, SCALE)
        patch_by_hand(reference, rewritten, 0.6, text_encoder_scale=0.5)
        assert_outputs_match(pipe, reference)
    stack.unload()
    assert stack.names == []
    with stack.applied([], lora_dirs=[lora_dir]):
        assert_outputs_match(pipe, build_tiny_reference_pipeline("sd1"))


def test_weights_changed_under_a_kept_request_are_not_undone(folders, tmp_path: Path, caplog) -> None:
    """Training or load_state_dict after a tagged request: restoring the originals would undo it."""
    reference = build_tiny_reference_pipeline("sd1")
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write(lora_dir, "tagged", kohya_keys(random_lora(reference, seed=16)))
    pipe, stack = ours(folders, "sd1")
    tags = [SimpleNamespace(name="tagged", text_encoder_weight=1.0, unet_weight=1.0)]
    with stack.applied(tags, lora_dirs=[lora_dir]):
        pass
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(1.0)  # an optimizer step, say
    changed = snapshot(pipe)
    with stack.applied([], lora_dirs=[lora_dir]):
        assert_unchanged(pipe, changed)
    assert "changed in place while <lora:tagged> #0 of an earlier request was merged" in caplog.text
    with stack.applied(tags, lora_dirs=[lora_dir]):  # merged again, on top of the weights as they are
        assert not torch.equal(pipe.unet.conv_in.weight, changed["unet.conv_in.weight"])
    with stack.applied([], lora_dirs=[lora_dir]):
        assert_unchanged(pipe, changed)


def test_half_precision_weights_unload_exactly(folders, tmp_path: Path) -> None:
    file = write(tmp_path, "a", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=17)))
    pipe = load(folders["sd1"], device="cpu", dtype=torch.bfloat16)
    stack = LoraStack(text_encoder=pipe.text_encoder, unet=pipe.unet)
    before = snapshot(pipe)
    stack.load(file, SCALE)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert not torch.equal(pipe.unet.conv_in.weight, before["unet.conv_in.weight"])
    stack.unload()
    assert_unchanged(pipe, before)


def test_a_request_merges_over_a_lora_loaded_in_another_precision(folders, tmp_path: Path) -> None:
    """Originals kept in bfloat16, weights since moved to float32 (``pipe.to``): merging still works."""
    reference = build_tiny_reference_pipeline("sd1")
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write(lora_dir, "tagged", kohya_keys(random_lora(reference, seed=16)))
    pipe = load(folders["sd1"], device="cpu", dtype=torch.bfloat16)
    stack = LoraStack(text_encoder=pipe.text_encoder, unet=pipe.unet)
    before = snapshot(pipe)
    stack.load(write(tmp_path, "persistent", kohya_keys(random_lora(reference, seed=15))), SCALE)
    pipe.to(dtype=torch.float32)
    tags = [SimpleNamespace(name="tagged", text_encoder_weight=1.0, unet_weight=1.0)]
    with stack.applied(tags, lora_dirs=[lora_dir]):
        assert pipe.unet.conv_in.weight.dtype == torch.float32
    stack.unload()
    assert_unchanged(pipe, {name: weight.float() for name, weight in before.items()})


# ---------------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_each_family_at_sd15_shapes(tmp_path: Path, hub_layouts: Path) -> None:
    """SD 1.5's UNet and text encoder with random weights; a LoRA on every attention and
    feed-forward layer, the resnets' 3×3 and 1×1 convs of the outer levels and the text encoder.
    kohya (Hub paths) must match diffusers' fuse_lora; kohya (LDM paths) and PEFT name the same
    layers, so they must give bit-identical outputs."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as ReferenceCLIPConfig
    from transformers import CLIPTextModel as ReferenceCLIP

    from stable_diffusion.weights import hub_to_ours, load_into

    configs = {
        component: json.loads((hub_layouts / "stable-diffusion-v1-5" / component / "config.json").read_text())
        for component in ("unet", "text_encoder")
    }
    torch.manual_seed(0)
    tiny = build_tiny_reference_pipeline("sd1")
    reference = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=ReferenceCLIP(ReferenceCLIPConfig.from_dict(configs["text_encoder"])).eval(),
        tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel.from_config(configs["unet"]).eval(),
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Our networks get copies: diffusers fuses in place.
    unet = build_on_meta(UNet, UNetConfig.from_hub_config(configs["unet"]))
    load_into(unet, hub_to_ours("unet", {k: v.clone() for k, v in reference.unet.state_dict().items()}))
    text_encoder = build_on_meta(CLIPTextModel, CLIPTextConfig.from_hub_config(configs["text_encoder"]))
    load_into(text_encoder, hub_to_ours("clip", {k: v.clone() for k, v in reference.text_encoder.state_dict().items()}))
    stack = LoraStack(text_encoder=text_encoder, unet=unet)
    outer = ("down_blocks.0.", "mid_block.", "up_blocks.3.")
    spec = {
        key: f
        for key, f in random_lora(reference, seed=18, alpha=lambda weight: RANK).items()
        if key[0] == "text_encoder" or "transformer_blocks" in key[1] or key[1].startswith(outer)
    }
    assert {tuple(f.down.shape[2:]) for f in spec.values()} == {(), (1, 1), (3, 3)}

    generator = torch.Generator().manual_seed(19)
    x, t = torch.randn(1, 4, 64, 64, generator=generator), torch.tensor([500.0])
    context = torch.randn(1, 77, 768, generator=generator)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)

    def outputs():
        with torch.no_grad():
            return unet(x, t, context), text_encoder(ids)

    files = {
        "kohya": write(tmp_path, "kohya", kohya_keys(spec)),
        "ldm": write(tmp_path, "ldm", kohya_keys(spec, unet_path=ldm_path_of(configs["unet"]))),
        "peft": write(tmp_path, "peft", peft_keys(spec)),
    }
    results = {}
    for family, file in files.items():
        stack.load(file, SCALE)
        results[family] = outputs()
        stack.unload()
    reference.load_lora_weights(str(files["kohya"]))
    reference.fuse_lora(lora_scale=SCALE)
    with torch.no_grad():
        expected = reference.unet(x, t, encoder_hidden_states=context).sample, reference.text_encoder(ids)[0]
    for ours_output, reference_output in zip(results["kohya"], expected, strict=True):
        assert relative_error(ours_output, reference_output) <= TOL
    for family in ("ldm", "peft"):
        assert all(torch.equal(a, b) for a, b in zip(results[family], results["kohya"], strict=True))


# ------------------------------------------------------------------------ through the pipeline
def test_pipeline_tag_equals_load_lora_and_leaks_into_nothing(folders, tmp_path: Path) -> None:
    """``<lora:NAME:W>`` in a prompt = ``pipe.load_lora(NAME, W)`` for that request only."""
    import threading

    reference = build_tiny_reference_pipeline("sd1")
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    path = write(lora_dir, "styled", kohya_keys(random_lora(reference, seed=21)))
    pipe = load(folders["sd1"], device="cpu", dtype=torch.float32, lora_dirs=[lora_dir])
    options = dict(width=32, height=32, steps=3, sampler="euler", seed=5)

    def pixels(prompt: str, **extra) -> np.ndarray:
        return np.asarray(pipe.text_to_image(prompt, **options, **extra).images[0])

    plain = pixels("a cat")
    tagged = pipe.text_to_image("a cat <lora:styled:0.7>", **options)
    assert tagged.parameters[0].startswith("a cat <lora:styled:0.7>\n")  # the prompt as typed
    assert pipe.loras == [] and np.array_equal(pixels("a cat"), plain)  # nothing leaks into the next request
    assert pipe.load_lora(path, 0.7) == "styled"
    np.testing.assert_array_equal(np.asarray(tagged.images[0]), pixels("a cat"))
    pipe.unload_lora()
    np.testing.assert_array_equal(pixels("a cat"), plain)
    assert not np.array_equal(np.asarray(tagged.images[0]), plain)

    # A request without tags that starts while a tagged one runs never sees its LoRA.
    started, results = threading.Event(), {}

    def slow(step: int, total: int, x0) -> None:
        started.set()
        time.sleep(0.2)

    tagged_run = threading.Thread(target=lambda: results.setdefault(
        "tagged", pipe.text_to_image("a cat <lora:styled:0.7>", **options, callback=slow)))
    tagged_run.start()
    started.wait(10)
    results["plain"] = pixels("a cat")
    tagged_run.join()
    np.testing.assert_array_equal(results["plain"], plain)
    np.testing.assert_array_equal(np.asarray(results["tagged"].images[0]), np.asarray(tagged.images[0]))

    with pytest.raises(LoraError, match="unknown LoRA 'nope'.*Available: styled"):
        pipe.text_to_image("a cat <lora:nope:1>", **options)


def test_pipeline_repeats_a_tagged_prompt_without_merging_or_encoding(folders, tmp_path: Path) -> None:
    """Another seed of a tagged prompt: the LoRA stays merged, so the prompt's states are reused too."""
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write(lora_dir, "styled", kohya_keys(random_lora(build_tiny_reference_pipeline("sd1"), seed=21)))
    pipe = load(folders["sd1"], device="cpu", dtype=torch.float32, lora_dirs=[lora_dir])
    options = dict(width=32, height=32, steps=2, sampler="euler")
    pipe.text_to_image("a dog <lora:styled:0.7>", **options, seed=1)
    written, encodings = versions(pipe), []
    pipe.text_encoder.register_forward_hook(lambda *_: encodings.append(1))
    again = pipe.text_to_image("a dog <lora:styled:0.7>", **options, seed=2)
    assert versions(pipe) == written and encodings == []
    pipe.unload_lora()
    assert versions(pipe) != written
    pipe.load_lora(lora_dir / "styled.safetensors", 0.7)
    np.testing.assert_array_equal(np.asarray(pipe.text_to_image("a dog", **options, seed=2).images[0]),
                                  np.asarray(again.images[0]))
