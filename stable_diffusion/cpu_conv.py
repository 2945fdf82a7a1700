"""Which algorithm runs each CPU convolution fastest, measured per shape on the machine at hand.

PyTorch sends every CPU float convolution to oneDNN's direct kernels. On a 2-core AMD EPYC (Zen 3,
AVX2) those were up to 3× slower than the classic lowering of a convolution to one matrix product
over unfolded patches (im2col: Chellapilla et al., 2006) on the UNet's small, wide feature maps, and
2× faster on its large ones (512² image, float32, milliseconds, oneDNN / im2col):

* 3×3, 1280 → 1280 channels on 8²: 57 / 18; on 16²: 96 / 58; 2560 → 1280 on 8²: 108 / 35;
* 3×3, 640 → 640 on 32²: 59 / 61 (even); 320 → 320 on 64²: 62 / 131.

oneDNN reorders the weights into its blocked layout at every call (a 1280-channel 3×3 kernel is
59 MB: 14,401 fresh pages touched per call), which costs more than the arithmetic on a small map;
im2col multiplies the weights as they are stored, but copies the input nine times, which costs
more on a large one. How much the reorder costs depends on whether the allocator hands out fresh
pages or reuses its heap: in a process holding three pipelines (a benchmark's), oneDNN took 20 ms
for the 8² convolution above, and im2col's advantage mostly went; hence a measurement, not a rule.

Where the line falls depends on the CPU, its thread count and the precision, so nothing here is
decided from flags or sizes: the first time a shape is met, both algorithms run it, the faster is
kept (im2col must win by ``IM2COL_MIN_SPEEDUP``: oneDNN is the default everyone else runs) and the
answer is cached in a small JSON file beside the precision probe's (see ``devices``), keyed by CPU
model, torch version and thread count. Timing a shape costs about five extra runs of it, once per
machine (the first 512² image meets 25 shapes), then nothing; a server pays it before its first
visitor with an image of its own (the app's warm-up). The two algorithms agree to float32 rounding
(relative 1e-5), as two BLAS libraries would.

Only inference (no autograd) of plain, zero-padded float32 or bfloat16 convolutions on contiguous
(not channels-last) inputs has the choice; everything else, and anything under ``torch.compile``, is
``F.conv2d``. Of those, only shapes of at least ``MIN_FLOPS`` whose unfolded patches stay under
``MAX_UNFOLD_BYTES`` are measured; smaller or larger ones stay with oneDNN.
``SD_CPU_CONV=onednn`` (or ``im2col``) skips the measurement and runs every such convolution so.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from stable_diffusion import devices

logger = logging.getLogger(__name__)

CPU_CONV_ENV = "SD_CPU_CONV"
ALGORITHMS = ("onednn", "im2col")
IM2COL_MIN_SPEEDUP = 1.1
TIMED_ROUNDS = 2
# Below ~0.1 GFLOP (a few milliseconds) the two extra timed runs cost more than any choice can save.
MIN_FLOPS = 1e8
# im2col copies every input value k² times; past this, oneDNN's direct kernel wins anyway (large maps).
MAX_UNFOLD_BYTES = 64 * 2**20
CACHE_FILE = "cpu-conv.json"
_clock = time.perf_counter  # the measurement's timer (tests replace it)
_choices: dict[str, dict[str, str]] = {}  # machine key -> {shape: algorithm}, this process's view
_lock = threading.Lock()

IntPair = tuple[int, int]


def im2col_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: IntPair, padding: IntPair
) -> torch.Tensor:
    """A zero-padded convolution as one matrix product: [C_out, C_in·k²] @ the unfolded patches [C_in·k², H'·W']."""
    out_channels, _, kh, kw = weight.shape
    height = (x.shape[-2] + 2 * padding[0] - kh) // stride[0] + 1
    width = (x.shape[-1] + 2 * padding[1] - kw) // stride[1] + 1
    if (kh, kw, stride, padding) == (1, 1, (1, 1), (0, 0)):
        patches = x.flatten(2)  # a 1×1 convolution needs no copy: each pixel is its own patch
    else:
        patches = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    out = torch.matmul(weight.flatten(1), patches)
    if bias is not None:
        out = out + bias[:, None]
    return out.view(x.shape[0], out_channels, height, width)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: IntPair,
    padding: IntPair | str,
    dilation: IntPair,
    groups: int,
) -> torch.Tensor:
    """``F.conv2d``, run by the algorithm measured fastest for this shape on this CPU where that can pay."""
    if not _can_choose(x, weight, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    algorithms: dict[str, Callable[[], torch.Tensor]] = {
        "onednn": lambda: F.conv2d(x, weight, bias, stride, padding),
        "im2col": lambda: im2col_conv2d(x, weight, bias, stride, padding),  # type: ignore[arg-type]
    }
    forced = _forced_algorithm()
    if forced is not None:
        return algorithms[forced]()
    shape = _shape_worth_measuring(x, weight, stride, padding)  # type: ignore[arg-type]
    if shape is None:
        return algorithms["onednn"]()
    known = _machine_choices().get(shape)
    if known is not None:
        return algorithms[known]()
    with _lock:  # one measurement at a time: two at once would time each other
        return _measure(shape, algorithms)


def _can_choose(x: torch.Tensor, weight: torch.Tensor, padding: IntPair | str, dilation: IntPair, groups: int) -> bool:
    """Whether im2col can stand in: CPU inference of a plain, zero-padded float convolution."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 4
        and x.is_contiguous()  # channels-last was chosen for oneDNN (the VAE's large maps)
        and not isinstance(padding, str)
        and groups == 1
        and tuple(dilation) == (1, 1)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    )


def _shape_worth_measuring(x: torch.Tensor, weight: torch.Tensor, stride: IntPair, padding: IntPair) -> str | None:
    """The cache's name for this convolution, or None when it is too small to pay for its timing or
    too large to unfold."""
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_pixels = ((height + 2 * padding[0] - kh) // stride[0] + 1) * ((width + 2 * padding[1] - kw) // stride[1] + 1)
    flops = 2 * batch * out_channels * in_channels * kh * kw * out_pixels
    unfold_bytes = batch * in_channels * kh * kw * out_pixels * x.element_size()
    if flops < MIN_FLOPS or unfold_bytes > MAX_UNFOLD_BYTES:
        return None
    dtype = str(x.dtype).removeprefix("torch.")
    return (
        f"{dtype} {batch}x{in_channels}x{height}x{width} -> {out_channels} "
        f"k{kh}x{kw} s{stride[0]}x{stride[1]} p{padding[0]}x{padding[1]}"
    )


def _forced_algorithm() -> str | None:
    value = os.environ.get(CPU_CONV_ENV, "").strip().lower()
    if value in ("", "measure", "auto"):
        return None
    if value not in ALGORITHMS:
        raise ValueError(f"{CPU_CONV_ENV}={value!r}: use one of {', '.join(ALGORITHMS)}, or leave it unset to measure")
    return value


def _machine_choices() -> dict[str, str]:
    """This machine's answers: read from the cache file the first time, then kept in memory."""
    key = devices.machine_key()
    choices = _choices.get(key)
    if choices is None:
        entry = devices.read_probe_cache(devices.probe_cache_file(CACHE_FILE)).get(key)
        valid = isinstance(entry, dict)
        choices = {s: a for s, a in entry.items() if a in ALGORITHMS} if valid else {}
        _choices[key] = choices
    return choices


def _measure(shape: str, algorithms: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
    """Runs the shape by both algorithms, keeps and caches the faster, and returns its output."""
    choices = _machine_choices()
    if shape in choices:  # measured by another thread while this one waited for the lock
        return algorithms[choices[shape]]()
    if not choices:
        logger.info("Timing CPU convolution algorithms for each new shape (once per machine; cached).")
    for run in algorithms.values():  # untimed: oneDNN builds its kernel, both allocate their buffers
        run()
    seconds, outputs = dict.fromkeys(ALGORITHMS, math.inf), {}
    # Best of TIMED_ROUNDS interleaved runs: on a shared machine the noise is other processes' time,
    # only ever added, and one busy moment must not settle a shape for good.
    for _ in range(TIMED_ROUNDS):
        for name in ("im2col", "onednn"):
            start = _clock()
            outputs[name] = algorithms[name]()
            seconds[name] = min(seconds[name], _clock() - start)
    best = "im2col" if seconds["im2col"] * IM2COL_MIN_SPEEDUP <= seconds["onednn"] else "onednn"
    logger.debug("%s: oneDNN %.1f ms, im2col %.1f ms -> %s", shape, 1e3 * seconds["onednn"], 1e3 * seconds["im2col"], best)
    choices[shape] = best
    devices.write_probe_cache(devices.probe_cache_file(CACHE_FILE), devices.machine_key(), dict(choices))
    return outputs[best]
