"""Where one UNet step of full-size SD 1.5 spends its time: torch.profiler, grouped by operator.

    python benchmarks/profile_unet.py                              # ours, bfloat16, 512², batch 2
    python benchmarks/profile_unet.py --dtype float32 --diffusers  # diffusers' UNet instead
    python benchmarks/profile_unet.py --trace /tmp/unet.json       # and a Chrome trace

The model is the random full-size SD 1.5 of ``make_full_size.py``. One untimed step runs first
(oneDNN builds its kernels on first use), then one profiled step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "cache" / "sd15-random")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--diffusers", action="store_true", help="profile diffusers' UNet")
    parser.add_argument("--channels-last", action="store_true", help="convert the UNet to channels_last first")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    if args.diffusers:
        from diffusers import UNet2DConditionModel

        diffusers_unet = UNet2DConditionModel.from_pretrained(args.model / "unet", torch_dtype=dtype).eval()

        def unet(x, t, context):
            return diffusers_unet(x, t, encoder_hidden_states=context).sample
    else:
        from stable_diffusion import load

        unet = load(args.model, device="cpu", dtype=dtype).unet
    if args.channels_last:
        (diffusers_unet if args.diffusers else unet).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=generator).to(dtype)
    context = torch.randn(2, 77, 768, generator=generator).to(dtype)
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        unet(x, t, context)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            unet(x, t, context)
            seconds = time.perf_counter() - start
    print(f"{'diffusers' if args.diffusers else 'ours'} {args.dtype} {args.size}² batch 2: {seconds:.2f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
