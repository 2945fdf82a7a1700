"""Which device and precision to run on when the user does not say.

CUDA gets float16 (the precision SD checkpoints are published in; the VAE decode is guarded
against fp16 overflow in the pipeline). On a CPU, bfloat16 is chosen only where the processor
has bf16 matrix units (Intel AMX tiles): there oneDNN runs bf16 convolutions and matmuls several
times faster than float32. AVX512-BF16 alone is not enough: its dot-product instruction does
no more multiply-adds per cycle than float32 FMAs, so on a 2-core AVX512-BF16 Xeon without AMX
a bf16 UNet step took 1.5x as long as a float32 one (benchmarks/README.md); without either, bf16
is emulated and slower still.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_has_bf16_matrix_units() -> bool:
    """True when the CPU has AMX tiles, which multiply bfloat16 matrices faster than float32 ones."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return check is not None and check()


def default_device() -> torch.device:
    """The best device present: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(name: str | torch.device | None) -> torch.device:
    """The device a user named ("cpu", "cuda", "cuda:1", "mps"), or the best present for None.

    Raises ValueError with one line to show when the name is not a device or the device is not
    on this machine, so that doors print that line instead of a traceback.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "auto")):
        return default_device()
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {name!r}: use cpu, cuda, cuda:N or mps (or leave it out for the best present).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine (no NVIDIA GPU or a CPU-only PyTorch): use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"There is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("Apple's MPS is not available on this machine: use --device cpu.")
    elif device.type != "cpu":
        raise ValueError(f"Unsupported device {name!r}: use cpu, cuda, cuda:N or mps.")
    return device


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The fastest precision that keeps the image on ``device`` (see module docstring)."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16_matrix_units() else torch.float32


def conv_memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory layout to give the VAE's activations on ``device``.

    On a CPU, oneDNN convolves channels-last (NHWC) tensors as they are, where NCHW ones are
    reordered to its blocked layout and back around every conv: the VAE, nearly all 3×3 convs on
    up to 512×512 maps, decodes a 512² image 10–20% faster in float32 (5–7% in bfloat16) this way.
    The UNet is not switched: its step got 5% slower (half of it is attention and linear layers,
    which gain nothing). Other devices keep NCHW (not measured here).
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Turn a user-facing precision name ("float32", "bf16", ...) into a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key in ("", "auto"):
        return None
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: choose one of {sorted(set(DTYPES))} or 'auto'.")
    return DTYPES[key]
