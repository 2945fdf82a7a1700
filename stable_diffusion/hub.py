"""Load Stable Diffusion from the Hugging Face Hub, a local folder or a single checkpoint file; save it.

``load`` takes three kinds of source:

* a Hub repo id in the diffusers layout (``stable-diffusion-v1-5/stable-diffusion-v1-5``): only
  the configs, the tokenizer and the weight files needed come down (``snapshot_download`` with
  ``allow_patterns``; the ``fp16`` variant when a half dtype is asked and the repo has it), into
  huggingface_hub's cache, which honours ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_TOKEN`` and
  ``HF_HUB_OFFLINE``;
* a local folder in that layout (what ``save`` and diffusers' ``save_pretrained`` write);
* a single ``.safetensors`` checkpoint in the original LDM layout (see ``single_file.py``).

``load(..., tiny_vae=...)`` and ``load_tiny_vae`` add the tiny autoencoder TAESD (``taesd.py``)
from a Hub repo id or folder in diffusers' ``AutoencoderTiny`` layout (``madebyollin/taesd``), a
folder of the original ``taesd_encoder`` / ``taesd_decoder`` files, or a single weights file.

The networks are built on the meta device and filled by ``weights.load_into``. Safetensors files
are memory-mapped, so a load that keeps the file's dtype on the CPU copies nothing, and any other
load converts each tensor once. Pickled weights (``.bin``, ``.ckpt``) can run code when
unpickled: they are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.

Every failure a user can act on raises ``ModelLoadError`` with a paragraph that says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTokenizer

from . import devices, single_file
from .clip import CLIPTextConfig, CLIPTextModel
from .pipelines import StableDiffusion
from .schedules import SchedulerConfig, check_prediction_type
from .taesd import TAESDConfig, TinyAutoencoder
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import build_on_meta, hub_to_ours, load_into, ours_to_hub, taesd_original_to_hub

__all__ = ["DEFAULT_MODEL", "DEFAULT_TINY_VAE", "ModelLoadError", "load", "load_tiny_vae", "model_name", "save"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_TINY_VAE = "madebyollin/taesd"  # the TAESD of SD 1.x and 2.x
BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"  # SD 1.5's CLIP tokenizer files

# network -> (sub-folder, weight file stem, pickled weight file stem, network class, config class)
_COMPONENTS: dict[str, tuple[str, str, str, type[nn.Module], Any]] = {
    "unet": ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model", UNet, UNetConfig),
    "vae": ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model", AutoencoderKL, VAEConfig),
    "clip": ("text_encoder", "model", "pytorch_model", CLIPTextModel, CLIPTextConfig),
}
# network -> (network class, config class) of every network _build makes
_NETWORK_CLASSES: dict[str, tuple[type[nn.Module], Any]] = {
    **{network: (network_class, config_class) for network, (*_, network_class, config_class) in _COMPONENTS.items()},
    "taesd": (TinyAutoencoder, TAESDConfig),
}
_HUB_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "clip": "CLIPTextModel"}
_SMALL_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"]
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do about it."""


# ------------------------------------------------------------------------------------------ load
def load(
    source: str | os.PathLike = DEFAULT_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    prediction_type: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    tiny_vae: str | os.PathLike | None = None,
    lora_dirs: Sequence[str | os.PathLike] = (),
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x model from a Hub repo id, a local folder or a single file.

    device, dtype: where and in what precision the networks live (default: the best device present
        and its fastest safe precision, see ``devices``).
    prediction_type: "epsilon" or "v_prediction", overriding the scheduler config. A single file
        cannot tell: SD 1.x defaults to ε and SD 2.x to v (see ``single_file.hub_configs``).
    tokenizer: a tokenizer folder, a diffusers folder or a Hub repo id to take the tokenizer from
        (single files: default the bundled CLIP tokenizer).
    variant: the weight file variant to load (e.g. "fp16"); default: "fp16" for half dtypes when
        the repo has it, else the full-precision files.
    allow_pickle: accept pickled weights (.bin / .ckpt), read with ``torch.load(weights_only=True)``.
    revision, token: the Hub revision (branch, tag or commit) and access token (default: HF_TOKEN).
    tiny_vae: also load the tiny autoencoder TAESD from this source (see ``load_tiny_vae``; e.g.
        ``DEFAULT_TINY_VAE``) into ``pipe.tiny_vae``, for fast decoding and live previews.
    lora_dirs: folders where a prompt's ``<lora:NAME:WEIGHT>`` tags find ``NAME.safetensors``.

    Raises ModelLoadError for anything the user can fix (network, missing files, wrong files).
    """
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    device, dtype = _device_and_dtype(device, dtype)
    # The tiny autoencoder first: a mistake in its source should not cost the model's download.
    tiny = None if tiny_vae is None else load_tiny_vae(tiny_vae, device, dtype, token=token)
    options = {"device": device, "dtype": dtype, "prediction_type": prediction_type, "tokenizer": tokenizer}
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        pipe = _shown_as(_load_single_file(path, name=name, allow_pickle=allow_pickle, **options), model_name(path))
    elif path.is_dir():
        pipe = _load_folder(path, name=name, variant=variant, allow_pickle=allow_pickle, **options)
        pipe = _shown_as(pipe, model_name(path))
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"There is no file or folder at {path.resolve()}. Pass an existing diffusers folder or a single "
            f".safetensors checkpoint, or a Hub repo id such as {DEFAULT_MODEL!r} (a single file on the Hub "
            "must be downloaded first, e.g. with `hf download ORG/NAME FILE.safetensors`)."
        )
    else:
        folder = _download(
            name, revision=revision, token=token, dtype=dtype, variant=variant, allow_pickle=allow_pickle
        )
        label = name if revision is None else f"{name}@{revision}"
        pipe = _load_folder(folder, name=label, variant=variant, allow_pickle=allow_pickle, token=token, **options)
    if tiny is not None:
        _check_tiny_vae_fits(tiny, pipe.vae, source=os.fspath(tiny_vae), model=pipe.name)
        pipe.tiny_vae = tiny
    pipe.lora_dirs = tuple(lora_dirs)
    return pipe


def _device_and_dtype(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The asked device and dtype, or the best ones present (see ``devices``)."""
    device = torch.device(device) if device is not None else devices.default_device()
    dtype = dtype if dtype is not None else devices.default_dtype(device)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type such as torch.float32, got {dtype}")
    return device, dtype


def model_name(source: str | os.PathLike) -> str:
    """The name the model at ``source`` goes by once loaded (a revision aside): a file's stem, a
    folder's name, or the Hub repo id. Local names keep this machine's paths private."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return path.stem
    return path.resolve().name if path.is_dir() else os.fspath(source)


def _shown_as(pipe: StableDiffusion, name: str) -> StableDiffusion:
    """A local model goes by its folder or file name (as in the web UIs' "Model:"), not its full path."""
    pipe.name = name
    return pipe


def _looks_like_path(source: str) -> bool:
    """Repo ids are "name" or "org/name"; anything else is meant as a path."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith((".safetensors", *_PICKLE_SUFFIXES, ".yaml", ".json"))
    )


def _load_folder(
    folder: Path,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: str | None,
    tokenizer: str | os.PathLike | None,
    variant: str | None,
    allow_pickle: bool,
    token: str | bool | None = None,
) -> StableDiffusion:
    available = _files_under(folder)
    missing: list[str] = []
    weight_files: dict[str, list[Path]] = {}
    for network, (sub, *_rest) in _COMPONENTS.items():
        if f"{sub}/config.json" not in available:
            missing.append(f"{sub}/config.json")
        file = _choose_weight_file(available, network, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
        if file is None:
            missing.append(_missing_weights(available, network, variant=variant, allow_pickle=allow_pickle))
        else:
            weight_files[network] = [folder / name for name in _expand_shards(folder, file)]
    if "scheduler/scheduler_config.json" not in available:
        missing.append("scheduler/scheduler_config.json")
    if tokenizer is None and not any(f.startswith("tokenizer/") for f in available):
        missing.append("the tokenizer/ folder")
    if missing:
        raise ModelLoadError(
            f"{name} is not a complete Stable Diffusion model in the diffusers layout: missing "
            f"{'; '.join(missing)}. A model folder needs unet/, vae/ and text_encoder/ (each a config.json "
            "and its weights), scheduler/scheduler_config.json and tokenizer/, as written by "
            "stable_diffusion.hub.save or diffusers' save_pretrained."
        )

    networks = {}
    for network, files in weight_files.items():
        sub = _COMPONENTS[network][0]
        config = _read_json(folder / sub / "config.json", name=name)
        state = _read_weights(files, allow_pickle=allow_pickle)
        networks[network] = _build(network, config, state, dtype=dtype, device=device, source=f"{name} ({sub}/)")
    scheduler = _scheduler(_read_json(folder / "scheduler" / "scheduler_config.json", name=name), prediction_type, name)
    tokenizer_model = _load_tokenizer(tokenizer if tokenizer is not None else folder / "tokenizer", token=token)
    return StableDiffusion(
        text_encoder=networks["clip"],
        unet=networks["unet"],
        vae=networks["vae"],
        tokenizer=tokenizer_model,
        scheduler=scheduler,
        name=name,
    )


def _load_single_file(
    path: Path,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    prediction_type: str | None,
    tokenizer: str | os.PathLike | None,
    allow_pickle: bool,
) -> StableDiffusion:
    if path.suffix not in (".safetensors", *_PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{path} is not a checkpoint file this package reads: expected a .safetensors file (or, with "
            f"allow_pickle=True, one of {', '.join(_PICKLE_SUFFIXES)}), or a diffusers folder."
        )
    state = _read_weights([path], allow_pickle=allow_pickle)
    try:
        networks = single_file.ldm_to_hub(state)
        configs = single_file.hub_configs(
            state, networks, prediction_type=prediction_type, original_config=single_file.read_sidecar(path)
        )
    except single_file.LDMLayoutError as error:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion 1.x/2.x checkpoint in the original single-file (LDM) layout: "
            f"{error}. For a model in the diffusers layout pass its folder or Hub repo id instead."
        ) from error
    built = {
        network: _build(network, configs[network], networks[network], dtype=dtype, device=device, source=str(path))
        for network in single_file.NETWORKS
    }
    if tokenizer is not None:
        tokenizer_model = _load_tokenizer(tokenizer)
    else:
        tokenizer_model = _load_tokenizer(BUNDLED_TOKENIZER, overrides=configs["tokenizer"])
    return StableDiffusion(
        text_encoder=built["clip"],
        unet=built["unet"],
        vae=built["vae"],
        tokenizer=tokenizer_model,
        scheduler=_scheduler(configs["scheduler"], prediction_type, name),
        name=name,
    )


def _build(
    network: str,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    source: str,
) -> nn.Module:
    network_class, config_class = _NETWORK_CLASSES[network]
    try:
        network_config = config_class.from_hub_config(dict(config))
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"The {network} config of {source} describes a network this package does not implement "
            f"(it reads Stable Diffusion 1.x/2.x): {error}"
        ) from error
    model = build_on_meta(network_class, network_config)
    try:
        load_into(model, hub_to_ours(network, state), dtype=dtype, device=device)
    except ValueError as error:
        raise ModelLoadError(
            f"The {network} weights of {source} do not fit the network its config describes; the checkpoint "
            f"is probably of another architecture or a different model than its config: {error}"
        ) from error
    return model.eval()


def _scheduler(config: Mapping[str, Any], prediction_type: str | None, name: str) -> SchedulerConfig:
    if prediction_type is not None:
        config = {**config, "prediction_type": prediction_type}
    try:
        return SchedulerConfig.from_hub_config(config)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"The scheduler config of {name} is not one this package reads: {error}") from error


# --------------------------------------------------------------------------------- weight files
def _choose_weight_file(
    available: set[str], network: str, *, dtype: torch.dtype, variant: str | None, allow_pickle: bool
) -> str | None:
    """The weight file of ``network`` to read (a shard index for sharded weights), or None.

    ``available``: paths relative to the model root. A variant is tried first when asked for, or
    "fp16" before the full-precision files for half dtypes (then converted once to ``dtype``).
    """
    sub, stem, pickle_stem, _, _ = _COMPONENTS[network]
    variants = [variant] if variant is not None else ["fp16", None] if dtype in _HALF_DTYPES else [None, "fp16"]
    for candidate in variants:
        dot = f".{candidate}" if candidate else ""
        # A variant's shard index: stem.safetensors.index.fp16.json (diffusers), stem.fp16.safetensors.index.json.
        names = [
            f"{stem}{dot}.safetensors",
            f"{stem}.safetensors.index{dot}.json",
            f"{stem}{dot}.safetensors.index.json",
        ]
        for name in names + ([f"{pickle_stem}{dot}.bin"] if allow_pickle else []):
            if f"{sub}/{name}" in available:
                return f"{sub}/{name}"
    return None


def _missing_weights(available: set[str], network: str, *, variant: str | None, allow_pickle: bool) -> str:
    """What to say when ``_choose_weight_file`` finds nothing."""
    sub, stem, pickle_stem, _, _ = _COMPONENTS[network]
    wanted = f"{sub}/{stem}{'.' + variant if variant else ''}.safetensors"
    pickled = [f for f in available if f.startswith(f"{sub}/{pickle_stem}") and f.endswith(".bin")]
    if pickled and not allow_pickle:
        return f"{wanted} (there are only pickled .bin weights: pass allow_pickle=True if you trust them)"
    if variant is not None:
        found = sorted(f for f in available if f.startswith(f"{sub}/") and ".safetensors" in f)
        return f"{wanted} (variant {variant!r}; {sub}/ has {', '.join(found) or 'no safetensors files'})"
    return wanted


def _shard_names(index: Path) -> list[str]:
    return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def _expand_shards(folder: Path, file: str) -> list[str]:
    """A weight file, or the shard files an index (``*.index.json``) lists."""
    if not file.endswith(".json"):
        return [file]
    return [str(Path(file).parent / shard) for shard in _shard_names(folder / file)]


def _files_under(folder: Path) -> set[str]:
    """The files of a model folder's components, as paths relative to it."""
    subfolders = [folder / sub for sub, *_ in _COMPONENTS.values()] + [folder / "scheduler", folder / "tokenizer"]
    files = [path for sub in subfolders if sub.is_dir() for path in sub.iterdir()]
    return {path.relative_to(folder).as_posix() for path in files if path.is_file()}


def _read_weights(files: Iterable[Path], *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_safetensors(file) if file.suffix == ".safetensors" else _read_pickle(file, allow_pickle))
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as views of its memory map (pages are read when used)."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the download may have been interrupted; load the model again.")
    try:
        with safe_open(path, framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as error:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({error}). It may be truncated, for example by an "
            "interrupted download (delete it and download it again), or not be a checkpoint at all."
        ) from error


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle file, and unpickling can run arbitrary code. Use a .safetensors version of "
            "the model, or pass allow_pickle=True if you trust its source (it is then read with "
            "torch.load(weights_only=True), which refuses anything but tensors and plain containers)."
        )
    try:
        # Only the zip format (torch >= 1.6) can be memory-mapped.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # unpickling reports bad input through many exception types
        raise ModelLoadError(
            f"{path} could not be read as a PyTorch checkpoint with torch.load(weights_only=True): {error}. "
            "It may be truncated, not a checkpoint, or contain objects other than tensors."
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # PyTorch Lightning checkpoints (LDM's .ckpt) nest the weights
    if not isinstance(checkpoint, dict) or not all(isinstance(t, torch.Tensor) for t in checkpoint.values()):
        raise ModelLoadError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return checkpoint


def _read_json(path: Path, *, name: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} of {name} is not valid JSON ({error}); download the model again.") from error


def _load_tokenizer(
    source: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None, token: str | bool | None = None
) -> CLIPTokenizer:
    """A tokenizer folder, a model folder with a tokenizer/ sub-folder, or a Hub repo id of either."""
    path = Path(source).expanduser()
    if not path.exists() and not _looks_like_path(os.fspath(source)):
        patterns = [
            "tokenizer/*",
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
        path = _snapshot(os.fspath(source), revision=None, token=token, allow_patterns=patterns)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(path, **(overrides or {}))
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(
            f"No CLIP tokenizer could be read from {path}: {error}. Pass tokenizer= a folder with "
            "vocab.json and merges.txt (or tokenizer.json), or a Hub repo id that has one."
        ) from error


# ------------------------------------------------------------------------------ tiny autoencoder
_TINY_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # diffusers' AutoencoderTiny layout
_TINY_VAE_ORIGINAL_FILES = {"encoder": "taesd_encoder.safetensors", "decoder": "taesd_decoder.safetensors"}
_TINY_VAE_LAYOUTS = (
    "config.json and diffusion_pytorch_model.safetensors (diffusers' AutoencoderTiny layout, as in "
    f"{DEFAULT_TINY_VAE!r}), or taesd_encoder.safetensors and taesd_decoder.safetensors (the original TAESD files)"
)


def load_tiny_vae(
    source: str | os.PathLike = DEFAULT_TINY_VAE,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> TinyAutoencoder:
    """Load the tiny autoencoder TAESD (``taesd.py``) from a Hub repo id, a folder or a single file.

    source: a Hub repo id in diffusers' AutoencoderTiny layout (``madebyollin/taesd``: config.json
        and diffusion_pytorch_model.safetensors, fetched like ``load``'s models, offline cache
        included); a local folder in that layout; a folder holding the original
        taesd_encoder.safetensors and taesd_decoder.safetensors; or one ``.safetensors`` file of
        weights in diffusers' layout (read with the SD TAESD config, ``TAESDConfig.sd()``).
    device, dtype, revision, token: as for ``load``.

    Raises ModelLoadError for anything the user can fix.
    """
    device, dtype = _device_and_dtype(device, dtype)
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(
                f"{path} is not a tiny autoencoder file this package reads: pass a .safetensors file of "
                f"AutoencoderTiny weights, or a folder holding {_TINY_VAE_LAYOUTS}."
            )
        state = _read_safetensors(path)
        return _build("taesd", TAESDConfig.sd().to_hub_config(), state, dtype=dtype, device=device, source=name)
    if path.is_dir():
        return _tiny_vae_from_folder(path, name=name, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(
            f"There is no file or folder at {path.resolve()}. Pass a tiny autoencoder folder or .safetensors "
            f"file, or a Hub repo id such as {DEFAULT_TINY_VAE!r}."
        )
    folder = _snapshot(name, revision=revision, token=token, allow_patterns=list(_TINY_VAE_FILES))
    _refuse_missing_files(
        name,
        revision,
        [file for file in _TINY_VAE_FILES if not (folder / file).is_file()],
        wanted=f"a tiny autoencoder in diffusers' AutoencoderTiny layout (SD 1.x/2.x's is {DEFAULT_TINY_VAE!r})",
    )
    return _tiny_vae_from_folder(folder, name=name, device=device, dtype=dtype)


def _tiny_vae_from_folder(folder: Path, *, name: str, device: torch.device, dtype: torch.dtype) -> TinyAutoencoder:
    if all((folder / file).is_file() for file in _TINY_VAE_FILES):
        config = _read_json(folder / "config.json", name=name)
        state = _read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    elif all((folder / file).is_file() for file in _TINY_VAE_ORIGINAL_FILES.values()):
        config = TAESDConfig.sd().to_hub_config()  # the original files are SD's TAESD
        halves = {half: _read_safetensors(folder / file) for half, file in _TINY_VAE_ORIGINAL_FILES.items()}
        try:
            state = taesd_original_to_hub(halves)
        except ValueError as error:
            raise ModelLoadError(f"The TAESD files in {folder} are not the original TAESD's: {error}") from error
    else:
        present = sorted(path.name for path in folder.iterdir() if path.is_file())
        raise ModelLoadError(
            f"{name} holds no tiny autoencoder: it needs {_TINY_VAE_LAYOUTS}; it has "
            f"{', '.join(present) or 'no files'}."
        )
    return _build("taesd", config, state, dtype=dtype, device=device, source=name)


def _check_tiny_vae_fits(tiny: TinyAutoencoder, vae: AutoencoderKL, *, source: str, model: str) -> None:
    """The tiny autoencoder must speak the model's latent space: same channels, same downsampling."""
    ours = (tiny.config.latent_channels, tiny.config.downsampling_factor)
    theirs = (vae.config.latent_channels, vae.config.downsampling_factor)
    if ours != theirs:
        raise ModelLoadError(
            f"The tiny autoencoder {source} does not fit {model}: it makes {ours[0]} latent channels at 1/{ours[1]} "
            f"of the image side, the model's VAE {theirs[0]} at 1/{theirs[1]}. For SD 1.x/2.x use {DEFAULT_TINY_VAE!r}."
        )


# ------------------------------------------------------------------------------------------ Hub
def _download(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    dtype: torch.dtype,
    variant: str | None,
    allow_pickle: bool,
) -> Path:
    """Fetches the configs and tokenizer, then the weight files chosen from the repo's file list."""
    folder = _snapshot(repo_id, revision=revision, token=token, allow_patterns=_SMALL_FILES)
    available = _files_under(folder)
    if not hub_constants.HF_HUB_OFFLINE:
        # snapshot_download has cached the repo's file list (absent when the Hub was unreachable).
        try:
            available |= {entry.path for entry in huggingface_hub.get_cached_repo_tree(repo_id, revision=revision)}
        except CachedRepoTreeNotFoundError:
            logger.info("no file list of %s cached: choosing among the files already downloaded", repo_id)
    chosen: list[str] = []
    missing = []
    for network in _COMPONENTS:
        file = _choose_weight_file(available, network, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
        if file is None:
            missing.append(_missing_weights(available, network, variant=variant, allow_pickle=allow_pickle))
        else:
            chosen += [file, _shard_pattern(file)] if file.endswith(".json") else [file]
    _refuse_missing_files(repo_id, revision, missing, wanted="a Stable Diffusion model in the diffusers layout")
    _snapshot(repo_id, revision=revision, token=token, allow_patterns=chosen)
    return folder


def _refuse_missing_files(repo_id: str, revision: str | None, missing: list[str], *, wanted: str) -> None:
    """Files a Hub repo lacks: offline they may just not be cached yet; online the repo is not ``wanted``."""
    if missing and hub_constants.HF_HUB_OFFLINE:
        raise _not_cached(repo_id, revision, missing=missing)
    if missing:
        raise ModelLoadError(f"The Hub repo {repo_id!r} is not {wanted}: missing {'; '.join(missing)}.")


def _shard_pattern(index_file: str) -> str:
    """The files an index names: ``stem[.variant]-00001-of-00002.safetensors``."""
    folder, name = index_file.rsplit("/", 1)
    stem, *rest = name.split(".")
    variant = [part for part in rest if part not in ("safetensors", "index", "json")]
    return f"{folder}/{'.'.join([stem, *variant])}-*-of-*.safetensors"


def _snapshot(repo_id: str, *, revision: str | None, token: str | bool | None, allow_patterns: list[str]) -> Path:
    """``snapshot_download`` with the Hub's failures turned into ModelLoadError."""
    with hub_errors(repo_id, revision=revision):
        return Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=allow_patterns)
        )


@contextlib.contextmanager
def hub_errors(repo_id: str, *, revision: str | None = None) -> Iterator[None]:
    """Turns the Hub's failures inside the block (a download from ``repo_id``) into ModelLoadError
    with a paragraph that says what to do."""
    try:
        yield
    except HFValidationError as error:
        raise ModelLoadError(
            f'{repo_id!r} is neither an existing file or folder nor a valid Hub repo id ("org/name"): {error}'
        ) from error
    except GatedRepoError as error:
        raise ModelLoadError(
            f"The Hub repo {repo_id!r} is gated: {_hub_reason(error)} Accept its conditions at "
            f"https://huggingface.co/{repo_id} while logged in, then pass token= or set HF_TOKEN."
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelLoadError(
            f"The Hub has no repo {repo_id!r} you can access: {_hub_reason(error)} Check the spelling; a private "
            "repo needs token= or HF_TOKEN. To load a local folder or file, pass a path that exists."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelLoadError(
            f"The Hub repo {repo_id!r} has no revision {revision!r}: {_hub_reason(error)} Pass an existing "
            "branch, tag or commit hash as revision=."
        ) from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise _not_cached(repo_id, revision) from error
    except HfHubHTTPError as error:
        raise ModelLoadError(f"The Hub could not serve {repo_id!r}: {_hub_reason(error)} Try again later.") from error


def _hub_reason(error: HfHubHTTPError) -> str:
    reason = error.server_message or str(error).splitlines()[0]
    return reason if reason.endswith(".") else reason + "."


def _not_cached(repo_id: str, revision: str | None, *, missing: Iterable[str] = ()) -> ModelLoadError:
    why = (
        "downloads are disabled (HF_HUB_OFFLINE=1)"
        if hub_constants.HF_HUB_OFFLINE
        else "the Hugging Face Hub could not be reached"
    )
    at = "" if revision is None else f" at revision {revision!r}"
    lacks = f" (it lacks {'; '.join(missing)})" if missing else ""
    return ModelLoadError(
        f"Cannot load {repo_id!r}{at}: it is not (completely) in the local Hugging Face cache "
        f"({hub_constants.HF_HUB_CACHE}){lacks} and {why}. Connect to the internet once to download it (a private or "
        "gated repo also needs token= or HF_TOKEN), point HF_HOME or HF_HUB_CACHE at a cache that holds it, or "
        "pass the path of a local diffusers folder or single .safetensors checkpoint instead."
    )


# ------------------------------------------------------------------------------------------ save
def save(pipe: StableDiffusion, folder: str | os.PathLike) -> Path:
    """Write ``pipe`` in the diffusers layout, which both ``load`` and diffusers' ``from_pretrained`` read.

    Weights keep their dtype. Each file is written under a temporary name and renamed into place,
    so an interrupted save never leaves a half-written checkpoint and a model loaded (memory-mapped)
    from the same folder keeps working. Returns the folder.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(folder / "model_index.json", model_index)
    for network, model in (("unet", pipe.unet), ("vae", pipe.vae), ("clip", pipe.text_encoder)):
        sub, stem, *_ = _COMPONENTS[network]
        (folder / sub).mkdir(exist_ok=True)
        _write_json(
            folder / sub / "config.json", {"_class_name": _HUB_CLASSES[network], **model.config.to_hub_config()}
        )
        tensors = {
            name: t.detach().to("cpu").contiguous() for name, t in ours_to_hub(network, model.state_dict()).items()
        }
        _atomic_write(
            folder / sub / f"{stem}.safetensors", functools.partial(save_file, tensors, metadata={"format": "pt"})
        )
    _write_json(
        folder / "scheduler" / "scheduler_config.json", pipe.scheduler.to_hub_config(class_name="PNDMScheduler")
    )
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    # transformers 5 writes only tokenizer.json; the classic vocab.json + merges.txt keep the folder
    # in SD's layout, readable by older transformers and other tools.
    backend = getattr(pipe.tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "tokenizer" / "vocab.json").exists():
        backend.model.save(str(folder / "tokenizer"))
    return folder


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    )


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.chmod(tmp, 0o644)  # some writers create private (0600) files; a model folder is for sharing
    os.replace(tmp, path)
