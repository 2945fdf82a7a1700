"""Peak memory of a 512² SD 1.5 run with and without the inside views (attention maps above all).

Full-size SD 1.5 with random weights (``make_full_size.py``), float32 on the CPU, a few steps at
guidance 7.5 (the classifier-free guidance batch of 2). Each run is a fresh process: load, one
``text_to_image``, and the peak resident memory (RSS, the kernel's high-water mark) at the end of
the last denoising step and after the VAE decode. The attention capture keeps one running sum per
cross-attention layer, never a step's attention tensors, so a run with maps should need less than
10% more than one without. Whole runs' times on a shared machine differ by tens of percent from
process to process, so the capture's cost is timed apart, in one process: guided UNet calls with
and without the capture, alternating, and the time spent inside the capture during the calls
that have it (the share that is the capture's own, whatever the machine's load).

    python benchmarks/bench_attention_memory.py            # -> benchmarks/results/attention-memory.{json,md}
    python benchmarks/bench_attention_memory.py --steps 1 --repeat 1   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from run import peak_rss_mib, run_child  # noqa: E402

VARIANTS = {
    "plain": {},
    "attention maps": {"attention_maps": True},
    "all three views": {"attention_maps": True, "trajectory": 100, "guidance_maps": 100},
}


def child(variant: str, folder: Path, steps: int) -> dict[str, float]:
    """Runs in the fresh process: load, generate once, measure."""
    import torch

    from stable_diffusion.hub import load

    pipe = load(folder, device="cpu", dtype=torch.float32)
    after_load = peak_rss_mib()
    peaks = {}

    def on_step(step: int, total: int, x0_hat: torch.Tensor) -> None:
        if step == total - 1:
            peaks["denoising"] = peak_rss_mib()

    start = time.perf_counter()
    result = pipe.text_to_image("a watercolor lighthouse at dawn, seen from the beach", width=512, height=512,
                                steps=steps, guidance_scale=7.5, sampler="euler", seed=0, callback=on_step,
                                **VARIANTS[variant])
    seconds = time.perf_counter() - start
    if VARIANTS[variant].get("attention_maps"):
        assert len(result.attention_maps[0]) == 10 and result.attention_maps[0][0][1].shape == (512, 512)
    return {"after_load_mib": after_load, "denoising_peak_mib": peaks["denoising"], "run_peak_mib": peak_rss_mib(),
            "seconds": seconds}


def timing(folder: Path, repeat: int) -> dict[str, float]:
    """Runs in a fresh process: guided 512² UNet calls with and without the attention capture, alternating."""
    import statistics

    import torch

    from stable_diffusion import inside, layers
    from stable_diffusion.hub import load

    pipe = load(folder, device="cpu", dtype=torch.float32)
    x = torch.randn(2, 4, 64, 64)
    context = torch.cat([pipe.encode_prompt(""), pipe.encode_prompt("a watercolor lighthouse at dawn")])
    seconds: dict[str, list[float]] = {"plain": [], "capture": [], "inside the capture": []}

    def timed_capture(capture: inside.AttentionCapture):
        def probe(*arguments) -> None:
            start = time.perf_counter()
            capture(*arguments)
            seconds["inside the capture"][-1] += time.perf_counter() - start

        return probe

    with torch.inference_mode():
        pipe.unet(x, 500, context)  # warm-up
        for _ in range(repeat):
            for name in ("plain", "capture"):
                probe = contextlib.nullcontext()
                if name == "capture":
                    seconds["inside the capture"].append(0.0)
                    probe = layers.attention_probe(timed_capture(inside.AttentionCapture(1)))
                start = time.perf_counter()
                with probe:
                    pipe.unet(x, 500, context)
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def markdown(settings: dict, results: dict[str, list[dict]], unet: dict[str, float]) -> str:
    plain = results["plain"]
    rows = [
        f"Machine: {settings['machine']}. torch {settings['torch']}, Python {settings['python']}.",
        f"Full-size SD 1.5, random weights, float32, 512x512, {settings['steps']} steps of euler, guidance 7.5 "
        f"(batch 2), a 10-token prompt; {settings['repeat']} fresh process(es) per variant, alternating; "
        f"peak RSS (the process's high-water mark, weights included). {settings['date']}. Run times are single "
        "processes on a shared machine (tens of percent apart from run to run): the capture's own cost is below.",
        "",
        "| variant | peak RSS through the last step | × plain | peak RSS of the whole run (with the VAE decode) "
        "| × plain | run time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_denoising = min(r["denoising_peak_mib"] for r in plain)
    base_run = min(r["run_peak_mib"] for r in plain)
    for variant, runs in results.items():
        denoising = max(r["denoising_peak_mib"] for r in runs)
        run = max(r["run_peak_mib"] for r in runs)
        seconds = min(r["seconds"] for r in runs)
        rows.append(f"| {variant} | {denoising:,.0f} MiB | {denoising / base_denoising:.3f} | {run:,.0f} MiB "
                    f"| {run / base_run:.3f} | {seconds:.1f} s |")
    rows.append(
        f"\nGuided 512² UNet call (batch 2), medians of 3 alternating in one process: {unet['plain']:.2f} s plain, "
        f"{unet['capture']:.2f} s with the attention capture, of which {unet['inside the capture']:.2f} s "
        f"({unet['inside the capture'] / unet['capture']:.1%}) inside the capture."
    )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "benchmarks" / "cache" / "sd15-random")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention-memory")
    parser.add_argument("--child", choices=[*VARIANTS, "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "timing":
        print(json.dumps(timing(args.folder, 3)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps)))
        return
    from make_full_size import make_full_size

    import torch

    from stable_diffusion import devices

    make_full_size(args.folder)
    for file in args.folder.rglob("*.safetensors"):  # a warm page cache for every run
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            results[variant].append(run_child(__file__, ["--child", variant, "--folder", str(args.folder),
                                                         "--steps", str(args.steps)]))
            print(variant, results[variant][-1], flush=True)
    unet = run_child(__file__, ["--child", "timing", "--folder", str(args.folder)])
    settings = {"machine": f"{devices.cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
                "python": platform.python_version(), "steps": args.steps, "repeat": args.repeat,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    table = markdown(settings, results, unet)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results, "unet_call_s": unet}, indent=2))
    args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
