"""Time the UNet's 3×3 convolution shapes one by one, by each way a CPU can run them.

    python benchmarks/bench_conv_kernels.py                       # -> results/conv-kernels.md
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/bench_conv_kernels.py --out conv-kernels-jemalloc.md

The ways, for one image (batch 1) of SD 2.1-base's shapes at 512², float32:

* ``oneDNN``: ``F.conv2d``, what torch and diffusers run; it reorders the weights into its blocked
  layout at every call;
* ``im2col``: unfolded patches times the weights as stored (``stable_diffusion.cpu_conv``);
* ``oneDNN, weights packed once``: the weights reordered once for this input shape
  (``torch._C._nn.mkldnn_reorder_conv2d_weight``) and the convolution run on them
  (``torch.ops.mkldnn._convolution_pointwise``), which is what ``torch.compile`` with freezing
  does; not used by the package (a lead: see benchmarks/README.md).

Each figure is the median of ``--repeats`` calls after two untimed ones, the ways alternating.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from stable_diffusion import devices  # noqa: E402
from stable_diffusion.cpu_conv import im2col_conv2d  # noqa: E402

# (in channels, out channels, side, stride): the UNet's 3×3 convolutions at 512², largest maps first.
SHAPES = [(320, 320, 64, 1), (320, 320, 64, 2), (640, 640, 32, 1), (640, 640, 32, 2), (1280, 640, 32, 1),
          (1280, 1280, 32, 1), (1280, 1280, 16, 1), (1280, 1280, 16, 2), (2560, 1280, 16, 1), (1280, 1280, 8, 1),
          (2560, 1280, 8, 1)]


def ways(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> dict:
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), [1, 1], [stride, stride], [1, 1], 1,
                                                        list(x.shape))
    return {
        "oneDNN": lambda: F.conv2d(x, weight, bias, stride, 1),
        "im2col": lambda: im2col_conv2d(x, weight, bias, (stride, stride), (1, 1)),
        "oneDNN, weights packed once": lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, [1, 1], [stride, stride], [1, 1], 1, "none", [], ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="conv-kernels.md", help="file name under benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for in_channels, out_channels, side, stride in SHAPES:
            x = torch.randn(1, in_channels, side, side)
            weight, bias = torch.randn(out_channels, in_channels, 3, 3) * 0.01, torch.randn(out_channels)
            calls = ways(x, weight, bias, stride)
            reference = calls["oneDNN"]()
            for call in calls.values():
                call()
                assert torch.allclose(call(), reference, rtol=1e-3, atol=1e-4)
            seconds: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    seconds[name].append(time.perf_counter() - start)
            medians = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
            rows.append((f"{in_channels} → {out_channels} on {side}², stride {stride}", medians))
            print(rows[-1], flush=True)
    names = list(rows[0][1])
    preload = os.environ.get("LD_PRELOAD", "")
    lines = [f"Machine: {devices.cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
             f"{'; LD_PRELOAD=' + preload if preload else ''}. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "", f"3×3 convolutions, batch 1, float32; medians of {args.repeats} alternating calls, ms.", "",
             "| shape | " + " | ".join(names) + " | packed / best of the other two |",
             "|---|" + "---:|" * (len(names) + 1)]
    for label, medians in rows:
        best_other = min(medians["oneDNN"], medians["im2col"])
        lines.append(f"| {label} | " + " | ".join(f"{medians[name]:.1f}" for name in names)
                     + f" | {medians['oneDNN, weights packed once'] / best_other:.2f} |")
    (ROOT / "benchmarks" / "results" / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
