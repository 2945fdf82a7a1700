"""Which device and precision to run on when the user does not say.

CUDA and MPS get float16 (the precision SD checkpoints are published in; the VAE decode is guarded
against fp16 overflow in the pipeline). On a CPU, whether bfloat16 beats float32 depends on the
processor in ways its feature flags do not tell, so it is measured (:func:`fastest_cpu_dtype`):

* AMD EPYC Zen 4 (AVX512-BF16, no AMX), 2 cores: a 256² UNet step with guidance takes 2.91 s in
  float32 and 1.31 s in bfloat16, for us and for diffusers alike: bf16 wins 2.2×.
* Intel Xeon (Emerald Rapids slice, AVX512-BF16, no AMX), 2 cores: bf16 was 1.6× *slower*, its
  ``vdpbf16ps`` doing no more multiply-adds per cycle than float32 FMAs, plus conversions
  (benchmarks/README.md).
* Intel Xeon with AMX tiles (AVX512-BF16 and AMX-BF16), 2 cores: SD-Turbo's 512² UNet pass takes
  4.6 s in float32 and 1.9 s in bfloat16 (2.4×); the probe's op mix 3.3 ms against 1.4 ms.
* AMD EPYC Zen 3 (AVX2 only, no bf16 instructions): a bf16 3×3 convolution takes 20-50× as long
  as a float32 one (measured on 320 channels).

The probe times a small UNet-like op mix (a 3×3 convolution and a linear layer) in both precisions,
in a few tens of milliseconds, once per machine: the answer is cached in a small JSON file in the
user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``), keyed by CPU model, torch version and
thread count. ``SD_CPU_DTYPE=float32`` (or ``bfloat16``) skips it. bfloat16 keeps the image: the
pipeline runs the sampler's arithmetic in float32 whatever the networks' precision.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
CPU_DTYPE_ENV = "SD_CPU_DTYPE"
# bfloat16 costs some precision, so it must win clearly; a CPU whose bf16 is this many times slower
# on the small first round runs it in emulation, and the probe stops there.
BF16_MIN_SPEEDUP = 1.15
EMULATED_SLOWDOWN = 4.0
_clock = time.perf_counter  # the probe's timer (tests replace it)
_probed: dict[str, torch.dtype] = {}  # this process's answers, by machine key
_probe_lock = threading.Lock()


def _op_mix(channels: int, side: int, dtype: torch.dtype) -> Callable[[], None]:
    """A 3×3 convolution on a ``side``² map and a linear layer (4× wider) on its tokens, as in a UNet block."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, side, side, generator=generator).to(dtype)
    conv = (torch.randn(channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5).to(dtype)
    tokens = torch.randn(side * side, channels, generator=generator).to(dtype)
    linear = (torch.randn(4 * channels, channels, generator=generator) / channels**0.5).to(dtype)

    def run() -> None:
        F.conv2d(x, conv, padding=1)
        F.linear(tokens, linear)

    return run


def _time_op_mix(channels: int, side: int, *, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the op mix per precision, after one untimed warm-up call each
    (oneDNN builds its kernels on first use), the two interleaved so that drift hits both. The
    best, not the median: on a shared machine the noise is other processes' time, only ever added."""
    runs = {name: _op_mix(channels, side, DTYPES[name]) for name in ("float32", "bfloat16")}
    best = dict.fromkeys(runs, math.inf)
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = _clock()
                run()
                best[name] = min(best[name], _clock() - start)
    return best


def measure_cpu_dtypes() -> dict[str, float]:
    """Seconds of a UNet-like op mix in float32 and in bfloat16 on this CPU, at the current thread count.

    A small first round (64 channels, 8×8: 5 MFLOP) catches emulated bf16 cheaply; otherwise the mix
    runs at a UNet's width (320 channels, 16×16: 0.7 GFLOP), where the kernels are compute-bound.
    """
    timings = _time_op_mix(64, 8, repeats=10)
    if timings["bfloat16"] > EMULATED_SLOWDOWN * timings["float32"]:
        return timings
    return _time_op_mix(320, 16, repeats=3)


def faster_dtype(timings: dict[str, float]) -> torch.dtype:
    """bfloat16 when it ran the op mix at least ``BF16_MIN_SPEEDUP`` times faster than float32, else float32."""
    return torch.bfloat16 if timings["bfloat16"] * BF16_MIN_SPEEDUP <= timings["float32"] else torch.float32


@functools.cache  # read once: the CPU does not change under a running process
def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the probe's answer depends on: the CPU model, torch's version and the thread count."""
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe_cache_file(name: str = "cpu-dtype.json") -> Path:
    """Where a per-machine measurement (this precision probe, ``cpu_conv``'s algorithms) keeps its answers."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stable-diffusion-from-scratch" / name


def read_probe_cache(path: Path) -> dict[str, dict]:
    """The cached answers by machine key; empty when the file is missing or unreadable (measured again)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def write_probe_cache(path: Path, key: str, entry: dict) -> None:
    """Sets one machine's answer in the file, keeping the others'; a cache that cannot be written only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = read_probe_cache(path)
        cache[key] = entry
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        partial.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as error:
        logger.warning("Could not cache a CPU measurement in %s: %s", path, error)


def fastest_cpu_dtype() -> torch.dtype:
    """float32 or bfloat16, whichever runs this CPU's UNet faster (see the module docstring).

    ``SD_CPU_DTYPE`` decides if set; else the cached probe for this machine; else the probe runs
    (tens of milliseconds) and its answer is cached.
    """
    override = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if override:
        try:
            dtype = parse_dtype(override)
        except ValueError as error:
            raise ValueError(f"{CPU_DTYPE_ENV}: {error}") from None
        if dtype is not None:
            return dtype
    key = machine_key()
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _cached_or_probed(key)
        return _probed[key]


def _cached_or_probed(key: str) -> torch.dtype:
    path = probe_cache_file()
    entry = read_probe_cache(path).get(key)
    if isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16"):
        return DTYPES[entry["dtype"]]
    start = time.perf_counter()
    timings = measure_cpu_dtypes()
    dtype = faster_dtype(timings)
    name = str(dtype).removeprefix("torch.")
    logger.info(
        "CPU precision probe: %s (op mix float32 %.2f ms, bfloat16 %.2f ms; probe %.2f s), cached in %s",
        name, 1e3 * timings["float32"], 1e3 * timings["bfloat16"], time.perf_counter() - start, path,
    )
    write_probe_cache(path, key, {"dtype": name, **{f"{k}_s": v for k, v in timings.items()}})
    return dtype


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
    """The fastest precision that keeps the image on ``device``: float16 on GPUs, the probe's on a CPU."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return fastest_cpu_dtype()


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
