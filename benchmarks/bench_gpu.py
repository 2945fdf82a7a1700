"""Time our pipeline against diffusers' on a GPU, in float16 and bfloat16: the prepared device check.

    python benchmarks/bench_gpu.py                        # CUDA, full-size random models -> results/gpu.{json,md}
    python benchmarks/bench_gpu.py --device cpu --quick   # the script itself on tiny models, in a minute

On a lent GPU machine ``bash benchmarks/gpu_check.sh`` runs it after ``tests/test_gpu.py``. The
models are random weights of the real shapes (``make_full_size.py``: SD 1.5, SD-Turbo's
architecture, TAESD). Measured, ours and diffusers' alternating in one process after a warm-up,
each call synchronised, medians:

* a UNet step at batch 2 (classifier-free guidance) for a 512² image;
* a whole 512² SD 1.5 image, prompt encoding and decoding included: 20 steps, guidance 7.5,
  DPM++ 2M Karras (diffusers: ``DPMSolverMultistepScheduler.from_config(its config,
  use_karras_sigmas=True)``);
* a whole 512² SD-Turbo image: 1 step, guidance 0, Euler a (diffusers:
  ``EulerAncestralDiscreteScheduler.from_config(its config)``), with the full VAE and with TAESD.

Each row also gives the largest difference between the two outputs (8-bit levels for images) and
the peak GPU memory of each side's last call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from make_full_size import default_out, make_full_size  # noqa: E402
from run import machine, timed  # noqa: E402

import stable_diffusion  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "a photograph of an astronaut riding a horse"


def alternate(calls: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, dict]:
    """Each call once untimed, then ``repeats`` rounds in alternating order: median seconds, peak memory, last output."""
    rows = {name: {"seconds": [], "output": call()} for name, call in calls.items()}
    for round_ in range(repeats):
        for name in (list(calls) if round_ % 2 == 0 else list(reversed(calls))):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, rows[name]["output"] = timed(calls[name], device)
            rows[name]["seconds"].append(seconds)
            if device.type == "cuda":
                rows[name]["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
    return rows


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def load_both(folder: Path, device: torch.device, dtype: torch.dtype, taesd: Path | None):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    ours = stable_diffusion.load(folder, device=device, dtype=dtype, tiny_vae=None if taesd is None else str(taesd))
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False).to(device)
    theirs.set_progress_bar_config(disable=True)
    tiny = None if taesd is None else AutoencoderTiny.from_pretrained(taesd, torch_dtype=dtype).to(device)
    return ours, theirs, tiny


def unet_step(ours, theirs, device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    with torch.inference_mode():
        rows = alternate({"ours": lambda: ours.unet(latents, t, context),
                          "diffusers": lambda: theirs.unet(latents, t, encoder_hidden_states=context).sample},
                         device, repeats)
    difference = (rows["ours"]["output"].float() - rows["diffusers"]["output"].float()).abs().max().item()
    return summary(rows, difference=f"{difference:.1e}")


def whole_image(ours, theirs, device: torch.device, size: int, repeats: int, *, sampler: str, steps: int,
                guidance: float, scheduler: str, scheduler_options: dict, decoder: str = "full") -> dict:
    import diffusers

    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config, **scheduler_options)
    rows = alternate({
        "ours": lambda: ours.text_to_image(PROMPT, width=size, height=size, steps=steps, guidance_scale=guidance,
                                           sampler=sampler, seed=1, decoder=decoder).images,
        "diffusers": lambda: theirs(PROMPT, width=size, height=size, num_inference_steps=steps,
                                    guidance_scale=guidance, generator=torch.Generator().manual_seed(1)).images,
    }, device, repeats)
    difference = int(np.abs(pixels(rows["ours"]["output"]) - pixels(rows["diffusers"]["output"])).max())
    return summary(rows, difference=f"{difference} levels")


def summary(rows: dict[str, dict], *, difference: str) -> dict:
    result = {"ours_s": rows["ours"]["median_s"], "diffusers_s": rows["diffusers"]["median_s"],
              "ratio": rows["ours"]["median_s"] / rows["diffusers"]["median_s"], "max_difference": difference}
    for side in ("ours", "diffusers"):
        if "peak_mib" in rows[side]:
            result[f"{side}_peak_mib"] = round(rows[side]["peak_mib"])
    return result


def models(quick: bool, scratch: Path) -> dict[str, Path | None]:
    if quick:  # a tiny SD 1.x-shaped model (its VAE has no TAESD): the script's logic, not the GPU's speed
        from conftest import build_tiny_reference_pipeline

        folder = scratch / "tiny"
        build_tiny_reference_pipeline("sd1").save_pretrained(folder)
        return {"sd15": folder, "sd-turbo": folder, "taesd": None}
    return {name: make_full_size(default_out(name), model=name) for name in ("sd15", "sd-turbo", "taesd")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny models, 32 px: check the script, not the speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.json and gpu.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, repeats = (32, 2) if args.quick else (512, args.repeats)
    started = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        paths = models(args.quick, Path(scratch))
        print(f"models ready in {time.perf_counter() - started:.0f} s", flush=True)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for model, cases in (("sd15", ["unet_step", "sd15_image"]), ("sd-turbo", ["turbo_full", "turbo_tiny"])):
                ours, theirs, tiny = load_both(paths[model], device, dtype, paths["taesd"])
                for case in cases:
                    if case == "turbo_tiny" and tiny is None:
                        continue
                    if case == "unet_step":
                        row = unet_step(ours, theirs, device, dtype, size, repeats)
                    elif case == "sd15_image":
                        row = whole_image(ours, theirs, device, size, max(1, repeats // 2), sampler="dpmpp_2m_karras",
                                          steps=20, guidance=7.5, scheduler="DPMSolverMultistepScheduler",
                                          scheduler_options={"use_karras_sigmas": True})
                    else:
                        full_vae = theirs.vae
                        if case == "turbo_tiny":
                            theirs.vae = tiny
                        row = whole_image(ours, theirs, device, size, repeats, sampler="euler_a", steps=1,
                                          guidance=0.0, scheduler="EulerAncestralDiscreteScheduler",
                                          scheduler_options={}, decoder="tiny" if case == "turbo_tiny" else "full")
                        theirs.vae = full_vae
                    results.append({"dtype": dtype_name, "case": case, **row})
                    print(json.dumps(results[-1]), flush=True)
                del ours, theirs, tiny
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write(args.out, machine(), device, size, results, time.perf_counter() - started, quick=args.quick)


def write(out: Path, described: dict, device: torch.device, size: int, results: list[dict], seconds: float, *,
          quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"machine": described, "device": str(device), "size": size,
                                              "quick": quick, "results": results}, indent=2) + "\n")
    labels = {"unet_step": "UNet step, batch 2", "sd15_image": "SD 1.5 image, 20 steps, DPM++ 2M Karras",
              "turbo_full": "SD-Turbo image, 1 step, full VAE", "turbo_tiny": "SD-Turbo image, 1 step, TAESD"}
    lines = [f"Machine: {described.get('gpu', described['cpu'])}; torch {described['torch']}, diffusers "
             f"{described['diffusers']}. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.0f} min"
             f"{' (--quick: tiny models, not a speed figure)' if quick else ''}.", "",
             f"{size}×{size}; medians of alternating runs after one untimed call each; peak: GPU memory of the last call.",
             "", "| dtype | case | ours | diffusers | ours / diffusers | max difference | peak ours | peak diffusers |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        peaks = [f"{row[key]:,} MiB" if key in row else "–" for key in ("ours_peak_mib", "diffusers_peak_mib")]
        lines.append(f"| {row['dtype']} | {labels[row['case']]} | {row['ours_s'] * 1e3:,.1f} ms | "
                     f"{row['diffusers_s'] * 1e3:,.1f} ms | {row['ratio']:.2f} | {row['max_difference']} | "
                     + " | ".join(peaks) + " |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
