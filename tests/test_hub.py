"""Loading and saving (stable_diffusion/hub.py), without the network.

Tiny random reference models are laid out (a) as a diffusers folder, (b) as huggingface_hub's cache
of a Hub repo, read offline through the real ``load(repo_id)`` path, and (c) as LDM single files;
the networks we load must compute what the references compute. ``save`` must write what both our
``load`` and diffusers' ``from_pretrained`` read. Errors must say what to do.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from conftest import HUB_LAYOUTS, build_tiny_reference_pipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from test_single_file import SCHEDULE_BUFFERS, SDXL_BASE, TINY_SD2_SIDECAR, TINY_SD_TURBO_SIDECAR, tiny_ldm_state
from torch import nn
from transformers import CLIPTokenizer

from stable_diffusion.hub import ModelLoadError, load, save

TOLERANCE = 1e-4
REPO_ID = "tiny-org/tiny-sd"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_networks_match(pipe, unet: nn.Module, vae: nn.Module, clip: nn.Module, *, vocab_size: int = 49408) -> None:
    """Our loaded networks compute what diffusers' / transformers' reference networks compute."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 16), generator=generator)
    context = torch.randn(1, 16, unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    images = torch.randn(1, 3, 16, 16, generator=generator)
    t = torch.tensor([900])
    with torch.no_grad():
        assert max_abs_diff(pipe.text_encoder(ids), clip(ids).last_hidden_state) < TOLERANCE
        assert (
            max_abs_diff(pipe.unet(latents, t, context), unet(latents, t, encoder_hidden_states=context).sample)
            < TOLERANCE
        )
        assert max_abs_diff(pipe.vae.decode(latents), vae.decode(latents).sample) < TOLERANCE
        assert max_abs_diff(pipe.vae.encode(images).mean, vae.encode(images).latent_dist.mean) < TOLERANCE


def assert_same_weights(pipe, other) -> None:
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


def assert_matches_pipeline(pipe, reference) -> None:
    assert_networks_match(pipe, reference.unet, reference.vae, reference.text_encoder)
    prompt = "a photo of an astronaut riding a horse, ünïcode!"
    ours = pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert ours == reference.tokenizer(prompt, padding="max_length", max_length=77).input_ids


@pytest.fixture(scope="module")
def sd1_reference():
    return build_tiny_reference_pipeline("sd1")


@pytest.fixture(scope="module")
def sd2_reference():
    return build_tiny_reference_pipeline("sd2")


@pytest.fixture(scope="module")
def tiny_sd2_folder(tmp_path_factory: pytest.TempPathFactory, sd2_reference) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd2")
    sd2_reference.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------ (a) diffusers folders
def test_load_diffusers_folder_sd1(tiny_sd1_folder: Path, sd1_reference) -> None:
    pipe = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    assert_matches_pipeline(pipe, sd1_reference)
    assert pipe.name == tiny_sd1_folder.name  # the folder name, as the web UIs show a model
    assert pipe.scheduler.prediction_type == "epsilon"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"


def test_load_diffusers_folder_sd2(tiny_sd2_folder: Path, sd2_reference) -> None:
    pipe = load(tiny_sd2_folder, device="cpu", dtype=torch.float32)
    assert_matches_pipeline(pipe, sd2_reference)
    assert pipe.scheduler.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!"
    assert pipe.unet.config.upcast_attention and pipe.unet.config.use_linear_projection
    assert (
        load(tiny_sd2_folder, device="cpu", dtype=torch.float32, prediction_type="epsilon").scheduler.prediction_type
        == "epsilon"
    )


def test_load_sharded_weights(tmp_path: Path, tiny_sd1_folder: Path, sd1_reference) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_sd1_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    sd1_reference.unet.save_pretrained(folder / "unet", max_shard_size="300KB")
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert_matches_pipeline(load(folder, device="cpu", dtype=torch.float32), sd1_reference)


def test_load_converts_to_the_asked_dtype(tiny_sd1_folder: Path) -> None:
    pipe = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    file = load_file(tiny_sd1_folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(pipe.unet.conv_in.weight, file["conv_in.weight"])
    half = load(tiny_sd1_folder, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
    assert torch.equal(half.unet.conv_in.weight, file["conv_in.weight"].bfloat16())


# ------------------------------------------------------------------------- (b) the Hub's cache
@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache. huggingface_hub reads its environment at import, so its
    constants are patched as well as the variables."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """Lays ``folder`` out as huggingface_hub caches a download: content-addressed blobs, a
    snapshot of symlinks to them per commit, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def cached_repo(hub_cache: Path, tiny_sd1_folder: Path, tmp_path: Path) -> Path:
    """The tiny SD 1.x model cached as REPO_ID, with an fp16 variant whose weights are doubled
    (so a test can tell which file was read)."""
    staging = tmp_path / "staging"
    shutil.copytree(tiny_sd1_folder, staging)
    for file in staging.glob("*/*.safetensors"):
        doubled = {name: (2 * t).half() if t.is_floating_point() else t for name, t in load_file(file).items()}
        save_file(
            doubled, file.with_name(file.name.replace(".safetensors", ".fp16.safetensors")), metadata={"format": "pt"}
        )
    add_to_hub_cache(hub_cache, REPO_ID, staging)
    return staging


def test_load_repo_id_from_the_cache_offline(cached_repo: Path, sd1_reference) -> None:
    pipe = load(REPO_ID, device="cpu", dtype=torch.float32)
    assert_matches_pipeline(pipe, sd1_reference)
    assert pipe.name == REPO_ID


def test_half_dtypes_read_the_fp16_variant(cached_repo: Path) -> None:
    full = load_file(cached_repo / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    half = load(REPO_ID, device="cpu", dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(half.unet.conv_in.weight, (2 * full).half())
    explicit = load(REPO_ID, device="cpu", dtype=torch.float32, variant="fp16")
    assert torch.equal(explicit.unet.conv_in.weight, (2 * full).half().float())
    with pytest.raises(ModelLoadError, match="variant 'int8'.*diffusion_pytorch_model.fp16.safetensors"):
        load(REPO_ID, device="cpu", dtype=torch.float32, variant="int8")


def test_download_fetches_only_the_files_needed(
    monkeypatch: pytest.MonkeyPatch, cached_repo: Path, tmp_path: Path
) -> None:
    """Online: configs and tokenizer first, then one variant of the weights chosen from the file
    list snapshot_download cached. The Hub is faked by copying files that match the patterns."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    repo_files = sorted(p.relative_to(cached_repo).as_posix() for p in cached_repo.rglob("*") if p.is_file())
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **kwargs) -> str:
        assert repo_id == REPO_ID
        for name in repo_files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(cached_repo / name, snapshot / name)
        return str(snapshot)

    def get_cached_repo_tree(repo_id: str, *, revision: str | None) -> list[SimpleNamespace]:
        return [SimpleNamespace(path=name) for name in repo_files]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", get_cached_repo_tree)
    pipe = load(REPO_ID, device="cpu", dtype=torch.bfloat16)
    downloaded = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    weights = {name for name in repo_files if name.endswith(".safetensors")}
    assert downloaded - weights == {name for name in repo_files if not name.endswith(".safetensors")}
    assert downloaded & weights == {name for name in weights if name.endswith(".fp16.safetensors")}
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16


def test_environment_is_honoured_in_a_fresh_process(cached_repo: Path, hub_cache: Path) -> None:
    """HF_HUB_CACHE and HF_HUB_OFFLINE as set before huggingface_hub is imported."""
    script = (
        "import torch\n"
        "from stable_diffusion.hub import ModelLoadError, load\n"
        f"pipe = load({REPO_ID!r}, device='cpu', dtype=torch.float32)\n"
        "print('loaded', pipe.name, float(pipe.unet.conv_in.weight.sum()))\n"
        "try:\n"
        "    load('tiny-org/not-cached', device='cpu', dtype=torch.float32)\n"
        "except ModelLoadError as error:\n"
        "    print('error', error)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    expected = load_file(cached_repo / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].sum()
    assert f"loaded {REPO_ID} {float(expected)}" in result.stdout
    assert "error Cannot load 'tiny-org/not-cached'" in result.stdout and "HF_HUB_OFFLINE=1" in result.stdout


def test_offline_with_an_empty_cache_says_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu", dtype=torch.float32)
    message = str(error.value)
    for needed in (
        "'stable-diffusion-v1-5/stable-diffusion-v1-5'",
        "HF_HUB_OFFLINE=1",
        str(hub_cache),
        "token=",
        "HF_TOKEN",
        "local diffusers folder",
        ".safetensors",
    ):
        assert needed in message


def _http_error(cls, status: int, server_message: str):
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO_ID}")
    return cls(
        f"{status} Client Error", response=httpx2.Response(status, request=request), server_message=server_message
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            _http_error(GatedRepoError, 403, "Access to model tiny-org/tiny-sd is restricted"),
            r"gated: Access to model .* is restricted\. Accept its conditions at https://huggingface\.co/tiny-org/tiny-sd",
        ),
        (
            _http_error(RepositoryNotFoundError, 404, "Repository not found"),
            r"no repo 'tiny-org/tiny-sd' you can access: Repository not found\. .*token=",
        ),
    ],
)
def test_hub_refusals_give_the_hubs_reason(monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str) -> None:
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ModelLoadError, match=expected):
        load(REPO_ID, device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------ (c) single files
def write_single_file(folder: Path, kind: str, *, suffix: str = ".safetensors") -> tuple[dict[str, nn.Module], Path]:
    """A tiny LDM checkpoint with what released files also carry: the schedule buffers and EMA
    bookkeeping (one float and one int32 scalar); SD-Turbo's (sgm's layout) carries its σ's."""
    networks, ldm = tiny_ldm_state(kind)
    if kind == "sd-turbo":
        ldm["denoiser.sigmas"] = torch.rand(1000, dtype=torch.float32)
    else:
        ldm |= {name: torch.rand(1000, dtype=torch.float32) for name in SCHEDULE_BUFFERS}
        ldm |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32)}
    path = folder / f"tiny-{kind}{suffix}"
    if suffix == ".safetensors":
        save_file({name: t.contiguous() for name, t in ldm.items()}, path)
    else:
        torch.save({"state_dict": ldm, "global_step": 1234}, path)
    sidecar = {"sd2": TINY_SD2_SIDECAR, "sd-turbo": TINY_SD_TURBO_SIDECAR}.get(kind)
    if sidecar is not None:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar))
    return networks, path


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd-turbo"])
def test_load_single_file(tmp_path: Path, kind: str) -> None:
    networks, path = write_single_file(tmp_path, kind)
    pipe = load(path, device="cpu", dtype=torch.float32)
    assert_networks_match(pipe, networks["unet"], networks["vae"], networks["clip"], vocab_size=1000)
    # SD 2.x: v from the sidecar; SD-Turbo: its own scheduler config (ε, trailing spacing).
    assert pipe.scheduler.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    # SD 1.x/2.x configs leave the spacing out: each sampler then uses its reference's default.
    assert pipe.scheduler.timestep_spacing == ("trailing" if kind == "sd-turbo" else None)
    repo = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1", "sd-turbo": "stable-diffusion-2-1"}[kind]
    expected = CLIPTokenizer.from_pretrained(HUB_LAYOUTS / repo / "tokenizer")
    prompt = "a corgi, !!"
    assert pipe.tokenizer(prompt, padding="max_length").input_ids == expected(prompt, padding="max_length").input_ids


def test_single_file_prediction_type_argument_wins(tmp_path: Path) -> None:
    _, path = write_single_file(tmp_path, "sd2")
    assert (
        load(path, device="cpu", dtype=torch.float32, prediction_type="epsilon").scheduler.prediction_type == "epsilon"
    )


def test_pickled_checkpoints_need_allow_pickle(tmp_path: Path) -> None:
    networks, path = write_single_file(tmp_path, "sd1", suffix=".ckpt")
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load(path, device="cpu", dtype=torch.float32)
    pipe = load(path, device="cpu", dtype=torch.float32, allow_pickle=True)
    assert_networks_match(pipe, networks["unet"], networks["vae"], networks["clip"], vocab_size=1000)


# ------------------------------------------------------------------------------------------ save
def test_save_is_read_by_load_and_by_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    _, path = write_single_file(tmp_path, "sd2")
    pipe = load(path, device="cpu", dtype=torch.float32)
    folder = save(pipe, tmp_path / "saved")
    assert folder == tmp_path / "saved"
    again = load(folder, device="cpu", dtype=torch.float32)
    assert_same_weights(again, pipe)
    assert again.scheduler == pipe.scheduler and again.unet.config == pipe.unet.config
    theirs = StableDiffusionPipeline.from_pretrained(folder)
    assert_networks_match(pipe, theirs.unet, theirs.vae, theirs.text_encoder, vocab_size=1000)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    assert theirs.tokenizer.pad_token == "!"


def test_save_over_the_folder_it_was_loaded_from(tmp_path: Path, tiny_sd1_folder: Path, sd1_reference) -> None:
    """Loaded weights are memory-mapped: saving renames new files into place instead of truncating them."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_folder, folder)
    pipe = load(folder, device="cpu", dtype=torch.float32)
    save(pipe, folder)
    assert_matches_pipeline(pipe, sd1_reference)
    assert_same_weights(load(folder, device="cpu", dtype=torch.float32), pipe)


# ---------------------------------------------------------------------------------------- errors
def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load(path, device="cpu", dtype=torch.float32)


def test_truncated_file(tmp_path: Path) -> None:
    _, path = write_single_file(tmp_path, "sd1")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(path, device="cpu", dtype=torch.float32)


def test_safetensors_of_something_else(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, path)
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion 1\.x/2\.x checkpoint .* no tensors of the UNet"):
        load(path, device="cpu", dtype=torch.float32)


def test_sdxl_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({name: torch.zeros(shape) for name, shape in SDXL_BASE.items()}, path)
    with pytest.raises(ModelLoadError, match=r"SDXL checkpoint \(two text encoders.*SDXL is not supported"):
        load(path, device="cpu", dtype=torch.float32)


def test_sd1_file_whose_tensors_do_not_fit(tmp_path: Path) -> None:
    _, ldm = tiny_ldm_state("sd1")
    ldm["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 16, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(ldm, path)
    with pytest.raises(
        ModelLoadError, match=r"(?s)unet weights .* do not fit.*down_blocks\.0\.resnets\.0\.conv1\.weight"
    ):
        load(path, device="cpu", dtype=torch.float32)


def test_folder_missing_a_component(tmp_path: Path, tiny_sd1_folder: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_folder, folder, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelLoadError, match=r"missing vae/config.json; vae/diffusion_pytorch_model.safetensors"):
        load(folder, device="cpu", dtype=torch.float32)


def test_paths_that_do_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no file or folder"):
        load(tmp_path / "nowhere" / "model.safetensors", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        load(tmp_path, device="cpu", dtype=torch.float32, prediction_type="eps")
