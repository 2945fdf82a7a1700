"""Load time and peak memory of loading full-size SD 1.5 (random weights, see make_full_size.py).

Each loader runs in a fresh process after the files were read once (a warm page cache), and
reports: the seconds ``load`` takes; the peak resident memory (RSS) above the process's RSS after
its imports, during the load and after every weight has been read once (a forward pass would
touch them all); and those as multiples of the weights' size on disk. Memory-mapped weights count
in RSS once their pages are touched.

    python benchmarks/bench_load.py                    # ours, float32
    python benchmarks/bench_load.py --diffusers        # and diffusers' from_pretrained, for comparison
    python benchmarks/bench_load.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(loader: str, folder: Path, dtype_name: str) -> dict[str, float]:
    """Runs in the fresh process: import, load, touch every weight; measure."""
    import torch

    dtype = getattr(torch, dtype_name)
    if loader == "ours":
        from stable_diffusion.hub import load

        def run():
            pipe = load(folder, device="cpu", dtype=dtype)
            return [pipe.unet, pipe.vae, pipe.text_encoder]
    else:
        from diffusers import StableDiffusionPipeline

        def run():
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
            return [pipe.unet, pipe.vae, pipe.text_encoder]

    baseline = rss_mib()
    start = time.perf_counter()
    networks = run()
    seconds = time.perf_counter() - start
    peak_load = peak_rss_mib()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for net in networks for p in net.parameters())
    return {
        "load_s": seconds,
        "baseline_mib": baseline,
        "peak_during_load_mib": peak_load - baseline,
        "peak_after_touch_mib": peak_rss_mib() - baseline,
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "benchmarks" / "cache" / "sd15-random")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' from_pretrained")
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.dtype)))
        return
    if not (args.folder / "model_index.json").is_file():
        sys.exit(f"no model at {args.folder}: run benchmarks/make_full_size.py first")

    files = sorted(args.folder.rglob("*.safetensors"))
    weights_mib = sum(f.stat().st_size for f in files) / 2**20
    for file in files:  # warm the page cache so every loader reads from memory
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    print(f"{args.folder}: {weights_mib:.0f} MiB of float32 weights on disk; loading as {args.dtype}")
    print(f"{'loader':<10} {'load s':>7} {'peak RSS during load':>22} {'peak RSS after touching':>25}")
    for loader in ["ours"] + (["diffusers"] if args.diffusers else []):
        command = [sys.executable, __file__, "--child", loader, "--folder", str(args.folder), "--dtype", args.dtype]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        during, after = result["peak_during_load_mib"], result["peak_after_touch_mib"]
        print(
            f"{loader:<10} {result['load_s']:>7.2f} {during:>10.0f} MiB ({during / weights_mib:4.2f}x) "
            f"{after:>12.0f} MiB ({after / weights_mib:4.2f}x)   [imports: {result['baseline_mib']:.0f} MiB]"
        )


if __name__ == "__main__":
    main()
