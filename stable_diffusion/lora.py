"""LoRA: low-rank weight updates (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
merged into the text encoder's and the UNet's weights.

A LoRA file holds, for some Linear and Conv2d layers, two factors ``down`` [r, in] and ``up``
[out, r] and optionally a scalar ``alpha``. Merged at strength ``multiplier`` it changes the layer's
weight W to

    W + multiplier · (alpha / r) · up @ down

(the update BA of eq. 3 of Hu et al., scaled by alpha / r as in their sec. 4.1; alpha defaults to
r). This is what A1111 applies and what diffusers' ``fuse_lora(lora_scale=multiplier)`` gives. For a
k×k convolution (LoCon-style LoRAs, LCM-LoRA) ``down`` is a k×k conv to r channels [r, in, k, k] and
``up`` a 1×1 conv [out, r, 1, 1]; running one after the other is one k×k conv whose kernel is
their product over r.

Key families (a file may mix them; each names a layer, then ``.lora_down.weight`` etc.):

* kohya / A1111, diffusers module paths: ``lora_unet_down_blocks_0_attentions_0_…_attn1_to_q``
  with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
* kohya, original LDM module paths: ``lora_unet_input_blocks_4_1_transformer_blocks_0_…``;
* diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``, the older
  ``.lora.down.weight`` / ``.lora_linear_layer.down.weight`` and attention-processor
  (``…attn1.processor.to_q_lora.down.weight``) spellings; alpha from diffusers' metadata;
* text encoder: ``lora_te_text_model_encoder_layers_…`` (kohya trains SD 1.x's CLIP and SD 2.x's
  OpenCLIP tower as transformers' CLIPTextModel, so both use its names) and ``text_encoder.<path>…``.

SDXL LoRAs (``lora_te1_``/``lora_te2_``) and other adapter kinds (LyCORIS LoHa/LoKr, DoRA, ...)
are refused with a message that names them.

kohya joins a module path with underscores, which cannot be split back reliably (``to_out_0``,
``time_emb_proj``): every real layer of the target network is spelled the same way and the names
are looked up, so a name resolves exactly or not at all.

A ``LoraStack`` keeps a CPU copy of each weight it changes and recomputes a changed weight as
original + Σ over the loaded LoRAs, in float32, so unloading restores the original bit for bit and
unloading one LoRA gives exactly the weights of never having loaded it. Everything in a file is
checked against the networks (names, shapes) before any weight changes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import nn

from .single_file import UNET_PREFIX, UNetLayout, unet_rules
from .weights import ours_to_hub

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "LORA_SUFFIXES",
    "Lora",
    "LoraError",
    "LoraLayer",
    "LoraStack",
    "LoraTagLike",
    "available_loras",
    "find_lora",
]

logger = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes

# The networks a LoRA changes -> their weight map in weights.py.
NETWORKS = {"text_encoder": "clip", "unet": "unet"}

# key prefix -> (network, how the module path is spelled)
_PREFIXES = {
    "lora_unet_": ("unet", "kohya"),
    "lora_te_": ("text_encoder", "kohya"),
    "unet.": ("unet", "diffusers"),
    "text_encoder.": ("text_encoder", "diffusers"),
}
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")

# key suffix -> (role, spelled after diffusers' old attention processors)
_ROLES = {
    ".lora_down.weight": ("down", False),  # kohya
    ".lora_up.weight": ("up", False),
    ".lora_A.weight": ("down", False),  # PEFT
    ".lora_B.weight": ("up", False),
    ".lora_linear_layer.down.weight": ("down", False),  # diffusers' text-encoder layers (0.2x)
    ".lora_linear_layer.up.weight": ("up", False),
    ".lora.down.weight": ("down", False),  # diffusers' LoRACompatible layers (0.19 - 0.21)
    ".lora.up.weight": ("up", False),
    "_lora.down.weight": ("down", True),  # diffusers' attention processors (< 0.19): attn1.processor.to_q_lora
    "_lora.up.weight": ("up", True),
    ".alpha": ("alpha", False),
}
# Those processors named the projections after their own fields; the layers they stand for:
_PROCESSOR_FIELDS = {
    "unet": {
        "processor.to_q": "to_q",
        "processor.to_k": "to_k",
        "processor.to_v": "to_v",
        "processor.to_out": "to_out.0",
    },
    "text_encoder": {
        "self_attn.to_q": "self_attn.q_proj",
        "self_attn.to_k": "self_attn.k_proj",
        "self_attn.to_v": "self_attn.v_proj",
        "self_attn.to_out": "self_attn.out_proj",
    },
}
# Other adapter kinds found in the wild (a pattern in their key names), recognised to say what they are.
_UNSUPPORTED = {
    r"\.hada_": "LyCORIS LoHa",
    r"\.lokr_": "LyCORIS LoKr",
    r"\.lora_mid\.": "LyCORIS LoCon with a CP-decomposed middle factor",
    r"\.dora_scale$|\.lora_magnitude_vector": "DoRA",
    r"\.diff(_b)?$": "LyCORIS full weight differences",
    r"\.oft_": "OFT",
    r"\.lora_B\.bias$|\.lora_up\.bias$": "LoRA with biases",
}
# The width of the text states each base model's UNet attends to (the text encoder's width).
_BASE_MODELS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_SHOWN = 10


class LoraError(ValueError):
    """A LoRA that cannot be applied to this model; the message says why. Nothing was changed."""


@dataclass(frozen=True)
class LoraLayer:
    """The low-rank update of one weight: ``down`` [r, in(, k, k)], ``up`` [out, r(, 1, 1)]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this update fits."""
        return (self.up.shape[0], *self.down.shape[1:])

    def add_to(self, flat_weight: torch.Tensor, scale: float, *, base: torch.Tensor | None = None) -> None:
        """flat_weight [out, in·k²] (float32) = (``base`` or itself) + scale · (alpha / r) · up @ down."""
        up = self.up.to(flat_weight.device, torch.float32).flatten(1)
        down = self.down.to(flat_weight.device, torch.float32).flatten(1)
        if base is None:
            flat_weight.addmm_(up, down, alpha=scale * self.alpha / self.rank)
        else:
            torch.addmm(base, up, down, alpha=scale * self.alpha / self.rank, out=flat_weight)


@dataclass(frozen=True)
class Lora:
    """A LoRA file resolved against one model: (network, our module name) -> its update."""

    name: str
    layers: Mapping[tuple[str, str], LoraLayer]
    families: tuple[str, ...]


class LoraTagLike(Protocol):
    """A LoRA a request names: a prompt's ``<lora:name:te_weight:unet_weight>`` (prompts.LoraTag)."""

    @property
    def name(self) -> str: ...

    @property
    def text_encoder_weight(self) -> float: ...

    @property
    def unet_weight(self) -> float: ...


# ------------------------------------------------------------------------------------ files
def available_loras(dirs: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """The LoRA files in ``dirs`` and their sub-folders by name (the file name without its suffix).

    A name found twice is the first one's: earlier folders first, ``.safetensors`` before pickles.
    Folders that do not exist are skipped.
    """
    found: dict[str, Path] = {}
    for folder in map(Path, dirs):
        files = [p for p in folder.expanduser().rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file()]
        for path in sorted(files, key=lambda p: (p.suffix != ".safetensors", p.as_posix())):
            found.setdefault(path.stem, path)
    return found


def find_lora(name: str, dirs: Sequence[str | os.PathLike]) -> Path:
    """The file of the LoRA called ``name`` (as in ``<lora:name:0.8>``) in ``dirs``."""
    available = available_loras(dirs)
    if name not in available:
        where = ", ".join(str(d) for d in dirs) or "no LoRA folders (pass lora_dirs=)"
        raise LoraError(
            f"unknown LoRA {name!r}: there is no {name}.safetensors in {where}. "
            f"Available: {', '.join(sorted(available)) or 'none'}."
        )
    return available[name]


def _lora_path(source: str | os.PathLike, *, weight_name: str | None) -> Path:
    """A LoRA file, a folder holding one, or a Hub repo id (downloaded) -> the local file."""
    from . import hub  # hub imports pipelines, which uses this module: import hub when called

    path = Path(source).expanduser()
    if path.is_file():
        if weight_name is not None:
            raise LoraError(f"weight_name= picks a file in a folder or Hub repo, but {path} is a file already")
        return path
    if path.is_dir():
        chosen = path / (weight_name or DIFFUSERS_WEIGHT_NAME)
        files = sorted(p.name for p in path.iterdir() if p.suffix in LORA_SUFFIXES and p.is_file())
        if weight_name is None and not chosen.is_file() and len(files) == 1:
            chosen = path / files[0]
        if not chosen.is_file():
            raise LoraError(f"{path} has no {chosen.name}; pass weight_name= one of: {', '.join(files) or 'none'}")
        return chosen
    if hub._looks_like_path(os.fspath(source)):
        raise LoraError(f"There is no LoRA file or folder at {path.resolve()}; pass an existing path or a Hub repo id.")
    repo_id, filename = os.fspath(source), weight_name or DIFFUSERS_WEIGHT_NAME
    with hub.hub_errors(repo_id):
        try:
            return Path(hf_hub_download(repo_id, filename))
        except RemoteEntryNotFoundError as error:
            raise LoraError(
                f"The Hub repo {repo_id!r} has no file {filename!r}: pass weight_name= the LoRA file's name in it."
            ) from error


def _read_lora_file(path: Path, *, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and, for safetensors, its metadata; read like model weights (hub.py)."""
    from . import hub  # see _lora_path

    if path.suffix not in LORA_SUFFIXES:
        raise LoraError(f"{path} is not a LoRA file: expected one of {', '.join(LORA_SUFFIXES)}")
    state = hub._read_weights([path], allow_pickle=allow_pickle)
    if path.suffix != ".safetensors":
        return state, {}
    try:
        with safe_open(path, framework="pt") as file:
            return state, file.metadata() or {}
    except SafetensorError as error:
        raise LoraError(f"cannot read the metadata of {path}: {error}") from error


# ------------------------------------------------------------------------------ key parsing
def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """``lora_unet_x_y.lora_down.weight`` -> (network, spelling, module path as written, role)."""
    prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
    suffix = next((s for s in _ROLES if key.endswith(s)), None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    network, spelling = _PREFIXES[prefix]
    path = key[len(prefix) : -len(suffix)]
    role, processor_field = _ROLES[suffix]
    if processor_field:
        for old, new in _PROCESSOR_FIELDS[network].items():
            if path == old or path.endswith("." + old):
                path = path[: -len(old)] + new
    return network, spelling, path, role


def _refuse_unsupported(keys: list[str], *, source: str) -> None:
    sdxl = [k for k in keys if k.startswith(_SDXL_PREFIXES)]
    if sdxl:
        raise LoraError(
            f"{source} is an SDXL LoRA (it has parts for a second text encoder, e.g. {sdxl[0]}); "
            "this package runs Stable Diffusion 1.x and 2.x."
        )
    kinds = sorted({kind for k in keys for pattern, kind in _UNSUPPORTED.items() if re.search(pattern, k)})
    if kinds:
        raise LoraError(
            f"{source} holds weights of another adapter kind ({', '.join(kinds)}), not plain LoRA "
            "(down, up, alpha); only LoRA and LoCon files are supported."
        )


def _metadata_alphas(metadata: Mapping[str, str], *, source: str) -> dict[str, tuple[float | None, dict[str, float]]]:
    """network -> (lora_alpha, alpha_pattern) of diffusers' PEFT LoRA metadata, when the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraError(f"{source}: its lora_adapter_metadata is not valid JSON ({error})") from error
    alphas = {}
    for network in NETWORKS:
        if config.get(f"{network}.use_rslora") or config.get(f"{network}.use_dora"):
            raise LoraError(f"{source} is an rsLoRA or DoRA adapter, which is not plain LoRA")
        alphas[network] = (config.get(f"{network}.lora_alpha"), config.get(f"{network}.alpha_pattern") or {})
    return alphas


def _alpha(
    parts: Mapping[str, torch.Tensor], defaults: tuple[float | None, dict[str, float]] | None, path: str, rank: int
) -> float:
    """The file's alpha; else PEFT's (a pattern matches a module path's tail); else the rank."""
    if "alpha" in parts:
        return float(parts["alpha"].item())
    lora_alpha, pattern = defaults or (None, {})
    for key, alpha in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(alpha)
    return float(lora_alpha) if lora_alpha is not None else float(rank)


# ------------------------------------------------------------------------ the stack
class SharedExclusiveLock:
    """Many holders of the shared side at once, or one of the exclusive side (a readers-writer lock).

    Generations read the network weights (shared); loading a LoRA writes them (exclusive).
    Writers are preferred, so a stream of generations cannot starve a LoRA request.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class LoraStack:
    """The LoRAs merged into one text encoder and one UNet, and the original weights they replaced.

    Thread safety: the stack changes the weights the networks compute with, in place. ``load`` and
    ``unload`` hold its lock exclusively; every generation runs inside ``applied``, which holds it
    shared when the weights already hold what the request asks for (such requests run side by
    side) and exclusively when it must swap a request's LoRAs in or out first (that request then
    runs alone, so its LoRAs reach no other).
    """

    def __init__(self, *, text_encoder: nn.Module, unet: nn.Module) -> None:
        self._lock = SharedExclusiveLock()
        self._networks = {"text_encoder": text_encoder, "unet": unet}
        self._loaded: dict[str, tuple[Lora, dict[str, float]]] = {}  # name -> (LoRA, scale per network), in order
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # CPU copies of the changed weights
        self._versions: dict[tuple[str, str], int] = {}  # each changed weight's version counter after our write
        self._request_tags: tuple[tuple[object, ...], ...] = ()  # what the LoRAs a request merged were read from
        self._request_names: list[str] = []  # their names in _loaded

    @property
    def names(self) -> list[str]:
        """The names of the LoRAs ``load`` loaded, in that order (not those of a request's tags)."""
        return [name for name in self._loaded if name not in self._request_names]

    def load(
        self,
        source: str | os.PathLike,
        scale: float = 1.0,
        *,
        text_encoder_scale: float | None = None,
        unet_scale: float | None = None,
        name: str | None = None,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> str:
        """Merges the LoRA at ``source`` with multiplier ``scale``; returns the name it is loaded under.

        source: a ``.safetensors`` file (pickled ``.pt``/``.ckpt``/``.bin`` ones with
            ``allow_pickle=True``), a folder with one, or a Hub repo id (``weight_name``: the file in
            the folder or repo; default diffusers' ``pytorch_lora_weights.safetensors``).
        text_encoder_scale, unet_scale: the multiplier of each network's part (default: ``scale``).
        name: what ``unload`` and ``names`` call it (default: the file or folder name).

        Raises LoraError (a ValueError) when the LoRA does not fit these networks, and
        hub.ModelLoadError when its file cannot be read or downloaded; the weights are then unchanged.
        """
        lora = self.read(source, name=name, weight_name=weight_name, allow_pickle=allow_pickle)
        text_encoder_scale = scale if text_encoder_scale is None else text_encoder_scale
        with self._lock.exclusive():
            self._add(lora, {"text_encoder": text_encoder_scale, "unet": scale if unet_scale is None else unet_scale})
        return lora.name

    def unload(self, name: str | None = None) -> None:
        """Takes out the LoRA called ``name`` (None: all of them, and those a request's tags left
        merged); its weights return to exactly what they would be had it never been loaded."""
        with self._lock.exclusive():
            if name is not None and name not in self.names:
                raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self.names) or 'none'}")
            if name is None:
                self._request_tags, self._request_names = (), []
            self._remove([name] if name is not None else list(self._loaded))

    @contextmanager
    def applied(
        self, tags: Sequence[LoraTagLike], *, lora_dirs: Sequence[str | os.PathLike], allow_pickle: bool = False
    ) -> Iterator[None]:
        """Runs the ``with`` block (a generation) with the LoRAs a request's prompt names
        (``prompts.extract_lora_tags``), found in ``lora_dirs``, merged beside the loaded ones, and
        no other request's.

        As in the web UIs, they stay merged after the block: the next request with the same tags
        (same files, unchanged on disk, same weights) merges nothing and runs beside others like
        it; one with other tags, or none, first swaps them for its own, alone. Swapping out
        restores the weights exactly. Every tag is resolved and checked before any weight changes.
        """
        files = [find_lora(tag.name, lora_dirs) for tag in tags]
        stats = [file.stat() for file in files]
        wanted = tuple(
            (str(file), stat.st_mtime_ns, stat.st_size, tag.text_encoder_weight, tag.unet_weight)
            for tag, file, stat in zip(tags, files, stats, strict=True)
        )
        with self._lock.shared():
            if wanted == self._request_tags and self._request_untouched():
                yield
                return
        loras = [
            self.read(file, name=f"<lora:{tag.name}> #{i}", allow_pickle=allow_pickle)
            for i, (tag, file) in enumerate(zip(tags, files, strict=True))
        ]
        with self._lock.exclusive():
            self._swap_request_loras(wanted, list(zip(loras, tags, strict=True)))
            yield

    def _request_untouched(self) -> bool:
        """Whether nobody changed the weights a request's LoRAs were merged into since (training,
        ``load_state_dict``): in-place writes advance a tensor's version counter."""
        return all(
            self._weight(key)._version == self._versions.get(key)
            for name in self._request_names
            for key in self._loaded[name][0].layers
        )

    def _swap_request_loras(self, wanted: tuple[tuple[object, ...], ...], loras: list[tuple[Lora, LoraTagLike]]) -> None:
        """Takes out the last request's LoRAs and merges these instead (exclusive lock held)."""
        untouched = self._request_untouched()
        if wanted == self._request_tags and untouched:
            return  # another request swapped them in while this one waited
        if untouched:
            self._remove(self._request_names)
        else:
            self._forget_request_loras()
        self._request_tags, self._request_names = (), []
        added: list[str] = []
        try:
            for lora, tag in loras:
                self._add(lora, {"text_encoder": tag.text_encoder_weight, "unet": tag.unet_weight})
                added.append(lora.name)
        except BaseException:
            self._remove(added)
            raise
        self._request_tags, self._request_names = wanted, added

    def _forget_request_loras(self) -> None:
        """Drops the last request's LoRAs without restoring the weights: someone changed them in
        place since, and restoring the originals would undo that change."""
        logger.warning(
            "The weights were changed in place while %s of an earlier request was merged into them: "
            "it stays in them. Load the model again for weights without it.", ", ".join(self._request_names))
        for name in self._request_names:
            for key in self._loaded.pop(name)[0].layers:
                if not any(key in lora.layers for lora, _ in self._loaded.values()):
                    self._originals.pop(key, None)
                    self._versions.pop(key, None)

    # ---------------------------------------------------------------- reading
    def read(
        self,
        source: str | os.PathLike,
        *,
        name: str | None = None,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> Lora:
        """Reads the LoRA at ``source`` (see ``load``) and checks that it fits; changes nothing."""
        path = _lora_path(source, weight_name=weight_name)
        if name is None:
            given = Path(os.fspath(source))
            name = given.stem if given.suffix in LORA_SUFFIXES else given.name
        state, metadata = _read_lora_file(path, allow_pickle=allow_pickle)
        label = f"LoRA {name!r} ({path})"
        keys = list(state)
        _refuse_unsupported(keys, source=label)
        groups: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
        unknown = []
        for key in keys:
            split = _split_key(key)
            if split is None:
                unknown.append(key)
            else:
                groups.setdefault(split[:3], {})[split[3]] = state[key]
        if not groups:
            raise LoraError(
                f"{label} holds no LoRA tensors (names like lora_unet_….lora_down.weight or unet.….lora_A.weight);"
                f" it may be a full checkpoint or a textual-inversion embedding. First names: {', '.join(keys[:5])}"
            )
        return self._resolve(groups, unknown, _metadata_alphas(metadata, source=label), name=name, source=label)

    def _resolve(
        self,
        groups: Mapping[tuple[str, str, str], Mapping[str, torch.Tensor]],
        unknown: list[str],
        peft_alphas: Mapping[str, tuple[float | None, dict[str, float]]],
        *,
        name: str,
        source: str,
    ) -> Lora:
        layers: dict[tuple[str, str], LoraLayer] = {}
        families, incomplete, mismatched = set(), [], []
        for (network, spelling, path), parts in groups.items():
            written = f"{network} {path}"
            target = self._spellings[network, spelling].get(path)
            if target is None:
                unknown.append(written)
                continue
            module, family = target
            if "down" not in parts or "up" not in parts:
                incomplete.append(f"{written} (has {', '.join(sorted(parts))})")
                continue
            down, up = parts["down"], parts["up"]
            if not _factors_fit(down, up):
                incomplete.append(f"{written} (down {list(down.shape)} and up {list(up.shape)} do not multiply)")
                continue
            layer = LoraLayer(down, up, _alpha(parts, peft_alphas.get(network), path, down.shape[0]))
            weight = self._weight((network, module))
            if layer.shape != tuple(weight.shape):
                mismatched.append((f"{network} {module}", layer, tuple(weight.shape)))
            if (network, module) in layers:
                incomplete.append(f"{written} (a second update of {network} {module})")
            layers[network, module] = layer
            families.add(family)
        if unknown or incomplete or mismatched:
            raise LoraError(_mismatch_message(source, unknown, incomplete, mismatched))
        logger.info("read %s: %d layers, %s", source, len(layers), ", ".join(sorted(families)))
        return Lora(name=name, layers=layers, families=tuple(sorted(families)))

    @cached_property
    def _spellings(self) -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
        """(network, spelling) -> {a module path as LoRA files write it: (our module name, key family)}."""
        tables: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
        for network, model in self._networks.items():
            weights = {
                f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            }
            # ours_to_hub renames one-to-one and keeps the order.
            hub_paths = {
                ours.removesuffix(".weight"): hub.removesuffix(".weight")
                for ours, hub in zip(weights, ours_to_hub(NETWORKS[network], weights), strict=True)
            }
            kohya, diffusers = tables.setdefault((network, "kohya"), {}), tables.setdefault((network, "diffusers"), {})
            for module, hub_path in hub_paths.items():
                # CLIP's layers are named with `text_model.` (transformers < 5, so every SD repo and
                # trainer) or without (transformers 5).
                for path in {hub_path, hub_path.removeprefix("text_model.")}:
                    _add_spelling(kohya, path.replace(".", "_"), module, "kohya (Hub paths)")
                    _add_spelling(diffusers, path, module, "diffusers/PEFT")
            if network == "unet":
                for module, ldm_path in _ldm_paths(model, hub_paths).items():
                    _add_spelling(kohya, ldm_path.replace(".", "_"), module, "kohya (LDM paths)")
        return tables

    # ---------------------------------------------------------------- merging
    def _weight(self, key: tuple[str, str]) -> torch.Tensor:
        network, module = key
        return self._networks[network].get_submodule(module).weight

    def _add(self, lora: Lora, scales: dict[str, float]) -> None:
        """Merges ``lora`` with a multiplier per network."""
        if lora.name in self._loaded:
            raise LoraError(f"a LoRA named {lora.name!r} is loaded already: unload it first, or pass another name=")
        for network, scale in scales.items():
            if not math.isfinite(scale):
                raise LoraError(f"the {network} scale of LoRA {lora.name!r} must be a finite number, got {scale}")
        for key in lora.layers:
            if key not in self._originals:
                self._originals[key] = self._weight(key).detach().to("cpu", copy=True)
        self._loaded[lora.name] = (lora, scales)
        try:
            self._refresh(lora.layers)
        except BaseException:
            del self._loaded[lora.name]
            self._refresh(lora.layers)
            raise

    def _remove(self, names: Iterable[str]) -> None:
        keys: set[tuple[str, str]] = set()
        for name in names:
            keys.update(self._loaded.pop(name)[0].layers)
        self._refresh(keys)

    @torch.no_grad()
    def _refresh(self, keys: Iterable[tuple[str, str]]) -> None:
        """Recomputes each weight as original + Σ scale · ΔW over the loaded LoRAs that change it."""
        for key in keys:
            weight, original, network = self._weight(key), self._originals[key], key[0]
            updates = [
                (lora.layers[key], scales[network]) for lora, scales in self._loaded.values() if key in lora.layers
            ]
            if not updates:
                weight.copy_(original)
                del self._originals[key]
                self._versions.pop(key, None)
                continue
            # In place where the weight is float32, the original and the first update in one pass: an
            # SD 1.5 UNet's weights are 3.4 GB, and temporaries or passes over them cost more than
            # the low-rank products (merging the LCM-LoRA: 10.4 s with ΔW as a temporary, 2.9 s so).
            in_place = weight.dtype == torch.float32 and weight.is_contiguous()
            if in_place:
                flat = weight.view(weight.shape[0], -1)
                (layer, scale), *updates = updates
                layer.add_to(flat, scale, base=original.to(weight.device, torch.float32).view_as(flat))
            else:
                flat = original.to(weight.device, torch.float32, copy=True).flatten(1)
            for layer, scale in updates:
                layer.add_to(flat, scale)
            if not in_place:
                weight.copy_(flat.view(weight.shape))
            self._versions[key] = weight._version


def _add_spelling(table: dict[str, tuple[str, str]], spelling: str, module: str, family: str) -> None:
    if table.setdefault(spelling, (module, family))[0] != module:
        raise RuntimeError(f"two layers are both spelled {spelling!r} in LoRA files: {table[spelling][0]}, {module}")


def _ldm_paths(unet: nn.Module, hub_paths: Mapping[str, str]) -> dict[str, str]:
    """Our UNet module -> its path in the original LDM UNet (``input_blocks.4.1.…``), by the rules
    single-file checkpoints are read with."""
    config = unet.config
    layout = UNetLayout(
        levels=len(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_attention=config.attention_levels,
        up_attention=tuple(reversed(config.attention_levels)),
        mid_attention=True,  # our MidBlock always attends
    )
    module_of = {f"{hub_path}.weight": module for module, hub_path in hub_paths.items()}
    paths = {}
    for rule in unet_rules(layout):
        ldm_suffixes = None if rule.suffixes is None else {hub: ldm for ldm, hub in rule.suffixes.items()}
        for hub_name, module in module_of.items():
            if not hub_name.startswith(rule.hub):
                continue
            suffix = hub_name[len(rule.hub) :]
            ldm_suffix = suffix if ldm_suffixes is None else ldm_suffixes.get(suffix)
            if ldm_suffix is not None:
                paths[module] = (rule.ldm + ldm_suffix).removeprefix(UNET_PREFIX).removesuffix(".weight")
    return paths


def _factors_fit(down: torch.Tensor, up: torch.Tensor) -> bool:
    """Linear: [r, in] and [out, r]; convolution: [r, in, k, k] and [out, r, 1, 1]."""
    if down.ndim != up.ndim or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return False
    return down.ndim == 2 or tuple(up.shape[2:]) == (1, 1)


def _mismatch_message(
    source: str, unknown: list[str], incomplete: list[str], mismatched: list[tuple[str, LoraLayer, tuple[int, ...]]]
) -> str:
    lines = [f"{source} does not fit this model; nothing was applied."]
    shapes = [
        f"{name}: the LoRA changes a {list(layer.shape)} weight, the model's is {list(shape)}"
        for name, layer, shape in mismatched
    ]
    for title, items in (("layers this model lacks", unknown), ("incomplete", incomplete), ("wrong shapes", shapes)):
        if items:
            more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            lines.append(f"  {title} ({len(items)}): {'; '.join(items[:_SHOWN])}{more}")
    # The cross-attention keys and values and the text encoder's projections read the text states,
    # whose width tells the base models apart.
    widths = [
        (layer.shape[1], shape[1])
        for name, layer, shape in mismatched
        if name.endswith(("attn2.to_k", "attn2.to_v", "self_attn.to_q"))
    ]
    if widths:
        theirs, ours = widths[0]
        lines.append(
            f"It was made for another base model: its layers read {theirs}-wide text states"
            f"{_base_model(theirs)}, this model's read {ours}-wide ones{_base_model(ours)}."
        )
    return "\n".join(lines)


def _base_model(width: int) -> str:
    return f" ({_BASE_MODELS[width]})" if width in _BASE_MODELS else ""
