"""Which device and precision to run on when the user does not say.

CUDA gets float16 (the precision SD checkpoints are published in; the VAE decode is guarded
against fp16 overflow in the pipeline). On a CPU, bfloat16 is chosen only where the processor
has native bf16 dot products (AVX512-BF16 or AMX): there oneDNN runs bf16 convolutions and
matmuls several times faster than float32 (see benchmarks/), elsewhere bf16 is emulated and slower.
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


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def default_device() -> torch.device:
    """The best device present: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The fastest precision that keeps the image on ``device`` (see module docstring)."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


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
