"""Speed and memory of our Stable Diffusion against diffusers', on full-size SD 1.5 with random weights.

One command measures both implementations on this machine and prints a table of medians with the
ratio ours / diffusers (below 1: ours is faster or smaller):

    python benchmarks/run.py            # ~16 min on 2 CPU cores; writes benchmarks/results/latest.{json,md}
    python benchmarks/run.py --quick    # a smoke test of the script (small sizes, one repetition)

What runs, for each precision (float32 and bfloat16 on the CPU; float16 too when a CUDA GPU is present):

* load: each loader in a fresh process, the two alternating, ``--load-reps`` times: the seconds the
  library's import takes, then ``load`` / ``from_pretrained``, the peak RSS after loading, and the peak RSS after using
  every network once (a small UNet step, a text encoding, a small VAE decode: memory-mapped
  weights count once their pages are touched). The weight files are read once first, so every
  loader reads from the page cache.
* compute: one process holds both models and alternates ours / diffusers call by call (which goes
  first alternates too), ``--reps`` times after one untimed small call of each network: one UNet step at
  batch 2 (classifier-free guidance) at ``--size`` and ``--small-size`` pixels, a VAE decode of one
  ``--size`` latent, one text encoding (77 tokens). Alternating inside one process spreads the
  machine's drift (±15% here) over both sides; the ratio of medians is what to read.
* whole image: once, ``text_to_image`` at ``--size`` with ``--steps`` steps: ours with the app's
  sampler (DPM++ 2M Karras) in every precision, diffusers with its default scheduler (PNDM, which
  calls the UNet once more than its step count) in float32 (``--whole-images all``: every
  precision). Next to it, the same image estimated from the components (2 text encodings + UNet
  calls × step + 1 decode), which checks the measurement.
* targets: our app's defaults (the CPU's default precision, DPM++ 2M Karras, ``--app-steps``)
  against diffusers' defaults (float32, PNDM, 50 steps), both estimated from the components.
* image agreement: the PSNR of our bfloat16 image against our float32 image, same seed. With
  random weights this measures how far the bf16 arithmetic drifts from fp32 through 20 UNet
  steps and the decoder, not image quality.

The model is built once by ``make_full_size.py`` (4.3 GB under benchmarks/cache/, git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "benchmarks" / "cache" / "sd15-random"
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "benchmarks" / "out"  # git-ignored: the whole images, for the PSNR
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
GUIDANCE = 7.5


# ----------------------------------------------------------------------------------------- memory
def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ------------------------------------------------------------------------------- the two models
class Ours:
    """Our pipeline behind the calls the benchmark times."""

    name = "ours"

    @staticmethod
    def import_library() -> None:
        import stable_diffusion  # noqa: F401

    def __init__(self, folder: Path, *, device, dtype) -> None:
        import stable_diffusion

        self.pipe = stable_diffusion.load(folder, device=device, dtype=dtype)
        self.device, self.dtype = device, dtype

    def unet_step(self, x, t, context):
        return self.pipe.unet(x, t, context)

    def encode_text(self, input_ids):
        return self.pipe.text_encoder(input_ids)

    def decode(self, latents):
        return self.pipe.vae.decode(latents)

    def text_to_image(self, *, size: int, steps: int):
        generation = self.pipe.text_to_image(
            PROMPT, width=size, height=size, steps=steps, guidance_scale=GUIDANCE, sampler="dpmpp_2m_karras", seed=SEED
        )
        return generation.images[0]


class Diffusers:
    """diffusers' StableDiffusionPipeline behind the same calls."""

    name = "diffusers"

    @staticmethod
    def import_library() -> None:
        import diffusers  # noqa: F401

    def __init__(self, folder: Path, *, device, dtype) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.dtype = device, dtype

    def unet_step(self, x, t, context):
        return self.pipe.unet(x, t, encoder_hidden_states=context).sample

    def encode_text(self, input_ids):
        return self.pipe.text_encoder(input_ids)[0]

    def decode(self, latents):
        return self.pipe.vae.decode(latents).sample

    def text_to_image(self, *, size: int, steps: int):
        import torch

        generator = torch.Generator("cpu").manual_seed(SEED)
        return self.pipe(
            PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator
        ).images[0]


IMPLEMENTATIONS = {"ours": Ours, "diffusers": Diffusers}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Seconds of ``fn()`` on ``device`` (its queued GPU work included), and its result."""
    _synchronize(device)
    start = time.perf_counter()
    out = fn()
    _synchronize(device)
    return time.perf_counter() - start, out


def _inputs(size: int, *, device, dtype, seed: int = 0) -> dict[str, Any]:
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    latent = size // 8
    return {
        "x": torch.randn(2, 4, latent, latent, generator=generator).to(device, dtype),
        "t": torch.tensor([500, 500], device=device),
        "context": torch.randn(2, 77, 768, generator=generator).to(device, dtype),
        "latents": torch.randn(1, 4, latent, latent, generator=generator).to(device, dtype),
        "input_ids": torch.randint(0, 49408, (1, 77), generator=generator).to(device),
    }


# -------------------------------------------------------------------------------- child: load
def child_load(impl: str, folder: Path, device_name: str, dtype_name: str) -> dict[str, Any]:
    """Fresh process: import, load, then use every network once; time and memory.

    The load time starts after the library's import (timed on its own), as a server pays the
    import once and may load several models.
    """
    import torch

    torch.set_num_threads(bench_threads())
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    import_s, _ = timed(IMPLEMENTATIONS[impl].import_library, device)
    baseline = rss_mib()
    seconds, model = timed(functools.partial(IMPLEMENTATIONS[impl], folder, device=device, dtype=dtype), device)
    peak_load = peak_rss_mib()
    inputs = _inputs(64, device=device, dtype=dtype)  # small: memory is about the weights here
    with torch.inference_mode():
        model.unet_step(inputs["x"], inputs["t"], inputs["context"])
        model.encode_text(inputs["input_ids"])
        model.decode(inputs["latents"][..., :8, :8])
    result = {
        "import_s": import_s,
        "load_s": seconds,
        "imports_rss_mib": baseline,
        "peak_rss_after_load_mib": peak_load,
        "peak_rss_after_use_mib": peak_rss_mib(),
    }
    if device.type == "cuda":
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ----------------------------------------------------------------------------- child: compute
def child_compute(
    folder: Path, device_name: str, dtype_name: str, *, size: int, small_size: int, steps: int, reps: int,
    whole_images: list[str],
) -> dict[str, Any]:
    """One process, both models; every benchmark alternates ours / diffusers."""
    import torch

    torch.set_num_threads(bench_threads())
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    models = [Ours(folder, device=device, dtype=dtype), Diffusers(folder, device=device, dtype=dtype)]
    big, small = _inputs(size, device=device, dtype=dtype), _inputs(small_size, device=device, dtype=dtype)
    benchmarks: dict[str, Callable[[Any], Any]] = {
        f"unet_step_{small_size}": lambda m: m.unet_step(small["x"], small["t"], small["context"]),
        f"unet_step_{size}": lambda m: m.unet_step(big["x"], big["t"], big["context"]),
        "text_encode": lambda m: m.encode_text(big["input_ids"]),
        f"vae_decode_{size}": lambda m: m.decode(big["latents"]),
    }
    times: dict[str, dict[str, list[float]]] = {}
    max_abs_diff: dict[str, float] = {}
    with torch.inference_mode():
        # One untimed call of each network first: it touches every weight (ours are memory-mapped)
        # and lets oneDNN build its kernels. Kernels for the bigger shapes are built in the first
        # timed repetition, on both sides alike; the median leaves that out.
        for model in models:
            model.unet_step(small["x"], small["t"], small["context"])
            model.encode_text(small["input_ids"])
            model.decode(small["latents"][..., :8, :8])
        for bench, call in benchmarks.items():
            times[bench] = {m.name: [] for m in models}
            outputs = {}
            for rep in range(reps):
                for model in models if rep % 2 == 0 else reversed(models):
                    seconds, outputs[model.name] = timed(functools.partial(call, model), device)
                    times[bench][model.name].append(seconds)
            # The same computation on both sides: how far apart the outputs are (random weights).
            max_abs_diff[bench] = float((outputs["ours"].float() - outputs["diffusers"].float()).abs().max())
            log(f"  {dtype_name} {bench}: " + ", ".join(f"{n} {statistics.median(t):.3f} s" for n, t in times[bench].items()))
    result: dict[str, Any] = {"times_s": times, "max_abs_diff": max_abs_diff}
    bench = f"text_to_image_{size}_{steps}_steps"
    for model in models:
        if model.name in whole_images:
            seconds, image = timed(functools.partial(model.text_to_image, size=size, steps=steps), device)
            times.setdefault(bench, {})[model.name] = [seconds]
            IMAGES.mkdir(parents=True, exist_ok=True)
            image.save(IMAGES / f"{model.name}-{device.type}-{dtype_name}-{size}-{steps}.png")
            log(f"  {dtype_name} {bench}: {model.name} {seconds:.1f} s")
    return result


# -------------------------------------------------------------------------------------- parent
def bench_threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "2"))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_child(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``script`` with ``args`` in a fresh process (its stderr shows through); the JSON it prints last."""
    process = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(process.stdout.splitlines()[-1])


def _child(args: list[str]) -> dict[str, Any]:
    return run_child(__file__, args)


def machine() -> dict[str, Any]:
    import diffusers
    import torch

    from stable_diffusion import devices

    description = {
        "cpu": devices.cpu_name(),
        "cpu_cores": os.cpu_count(),
        "threads": bench_threads(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "default_cpu_dtype": str(devices.default_dtype("cpu")).removeprefix("torch."),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def _median(values: list[float]) -> float:
    return statistics.median(values)


def psnr(a_path: Path, b_path: Path) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (higher: closer)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_path), dtype=np.float64)
    b = np.asarray(Image.open(b_path), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _row(
    device: str, dtype: str, benchmark: str, unit: str, ours: float | None, theirs: float | None, **extra: Any
) -> dict[str, Any]:
    ratio = None if ours is None or theirs is None else ours / theirs
    return {"device": device, "dtype": dtype, "benchmark": benchmark, "unit": unit, "ours": ours,
            "diffusers": theirs, "ratio": ratio, **extra}


def image_estimate(times: dict[str, dict[str, list[float]]], name: str, *, size: int, unet_calls: int) -> float:
    """A whole image from its measured parts: prompt and negative prompt, the UNet calls, one decode."""
    return (
        2 * _median(times["text_encode"][name])
        + unet_calls * _median(times[f"unet_step_{size}"][name])
        + _median(times[f"vae_decode_{size}"][name])
    )


def summarize(runs: dict[str, Any], *, size: int, steps: int, app_steps: list[int], app_dtype: str) -> dict[str, Any]:
    """Medians and ratios ours / diffusers, whole-image estimates, the targets' numbers and the PSNR."""
    rows = []
    for key, run in runs.items():
        device, dtype = key.split("/")
        loads = run["load"]
        for metric, unit in (("import_s", "s"), ("load_s", "s"), ("peak_rss_after_load_mib", "MiB"),
                             ("peak_rss_after_use_mib", "MiB"), ("peak_cuda_allocated_mib", "MiB")):
            if metric in loads["ours"][0]:
                ours, theirs = (_median([r[metric] for r in loads[name]]) for name in ("ours", "diffusers"))
                name = metric.removesuffix("_s").removesuffix("_mib")
                rows.append(_row(device, dtype, name, unit, ours, theirs, n=len(loads["ours"])))
        times = run["compute"]["times_s"]
        for bench, by_model in times.items():
            ours, theirs = (_median(by_model[name]) if name in by_model else None for name in ("ours", "diffusers"))
            rows.append(_row(device, dtype, bench, "s", ours, theirs, n=len(next(iter(by_model.values()))),
                             max_abs_diff=run["compute"]["max_abs_diff"].get(bench)))
        # PNDM, diffusers' default scheduler, calls the UNet once more than its step count.
        ours, theirs = (image_estimate(times, name, size=size, unet_calls=steps + (name == "diffusers"))
                        for name in ("ours", "diffusers"))
        rows.append(_row(device, dtype, f"text_to_image_{size}_{steps}_steps (estimate)", "s", ours, theirs, n=0))
    summary: dict[str, Any] = {"rows": rows, "targets": {}}
    targets = summary["targets"]
    for device in sorted({key.split("/")[0] for key in runs}):
        if f"{device}/float32" not in runs:
            continue
        fp32 = runs[f"{device}/float32"]["compute"]["times_s"]
        # The target's comparison: our app's defaults against diffusers' defaults (float32, PNDM, 50
        # steps), both at `size`, estimated from the measured components of the same run.
        fast = app_dtype if device == "cpu" else "float16"
        if f"{device}/{fast}" in runs:
            theirs_default = image_estimate(fp32, "diffusers", size=size, unet_calls=51)
            targets[f"{device}: diffusers defaults (float32, PNDM, 50 steps), s (estimate)"] = theirs_default
            for n in app_steps:
                ours_app = image_estimate(runs[f"{device}/{fast}"]["compute"]["times_s"], "ours", size=size, unet_calls=n)
                app = f"ours at the app defaults ({fast}, dpmpp_2m_karras, {n} steps)"
                targets[f"{device}: {app}, s (estimate)"] = ours_app
                targets[f"{device}: speedup of {app} over diffusers defaults"] = theirs_default / ours_app
        whole = f"text_to_image_{size}_{steps}_steps"
        for dtype in [key.split("/")[1] for key in runs if key.startswith(device + "/")]:
            ours_image = runs[f"{device}/{dtype}"]["compute"]["times_s"].get(whole, {}).get("ours")
            theirs_image = fp32.get(whole, {}).get("diffusers")
            if ours_image and theirs_image:
                targets[f"{device}: speedup of ours {dtype} over diffusers float32, {steps} steps each (measured)"] = (
                    theirs_image[0] / ours_image[0]
                )
            low = IMAGES / f"ours-{device}-{dtype}-{size}-{steps}.png"
            high = IMAGES / f"ours-{device}-float32-{size}-{steps}.png"
            if dtype != "float32" and low.is_file() and high.is_file():
                targets[f"{device}: PSNR of our {dtype} image against our float32 image, same seed, dB"] = psnr(low, high)
    return summary


def _format(value: float | None, unit: str, *, spec: str = "") -> str:
    if value is None:
        return "–"
    if spec:
        return format(value, spec)
    return f"{value:.2f} s" if unit == "s" else f"{value:,.0f} MiB"


def markdown(summary: dict[str, Any], description: dict[str, Any], settings: dict[str, Any]) -> str:
    gpu = f"; GPU {description['gpu']}" if "gpu" in description else ""
    lines = [
        (
            f"Machine: {description['cpu']}, {description['cpu_cores']} cores ({description['threads']} threads), "
            f"{description['memory_gib']} GiB RAM; AVX512-BF16 {'yes' if description['avx512_bf16'] else 'no'}, "
            f"AMX {'yes' if description['amx'] else 'no'}{gpu}; default CPU dtype {description['default_cpu_dtype']}. "
            f"torch {description['torch']}, diffusers {description['diffusers']}, Python {description['python']}."
        ),
        (
            f"Full-size SD 1.5 with random weights; medians of {settings['reps']} alternating repetitions, "
            f"{settings['load_reps']} fresh-process loads each; whole images run once. {settings['date']}, "
            f"{settings['wall_s'] / 60:.0f} min."
        ),
        "",
        "| device | dtype | benchmark | ours | diffusers | ours / diffusers | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['device']} | {row['dtype']} | {row['benchmark']} | {_format(row['ours'], row['unit'])} | "
            f"{_format(row['diffusers'], row['unit'])} | {_format(row['ratio'], '', spec='.2f')} | "
            f"{_format(row.get('max_abs_diff'), '', spec='.1e')} |"
        )
    if summary["targets"]:
        lines.append("")
        lines.extend(f"- {key}: {value:.2f}" for key, value in summary["targets"].items())
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="SD 1.5 in the diffusers layout")
    parser.add_argument("--size", type=int, default=512, help="image side of the big benchmarks")
    parser.add_argument("--small-size", type=int, default=256, help="image side of the second UNet step")
    parser.add_argument("--steps", type=int, default=20, help="steps of the whole images")
    parser.add_argument("--app-steps", type=int, nargs="+", default=[20, 25], help="app step counts for the targets")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each component")
    parser.add_argument("--load-reps", type=int, default=3, help="fresh-process loads of each implementation")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="CPU precisions")
    parser.add_argument(
        "--whole-images", choices=["default", "all", "none"], default="default",
        help="default: ours in every precision (for the PSNR), diffusers in float32 (the targets' reference)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, 2 steps, one repetition")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest", help="writes OUT.json and OUT.md")
    parser.add_argument("--child", choices=["load", "compute"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.small_size, args.steps, args.reps, args.load_reps = 128, 64, 2, 1, 1
    if args.child == "load":
        print(json.dumps(child_load(args.impl, args.model, args.device, args.dtype)))
        return
    if args.child == "compute":
        result = child_compute(args.model, args.device, args.dtype, size=args.size, small_size=args.small_size,
                               steps=args.steps, reps=args.reps, whole_images=args.images)
        print(json.dumps(result))
        return

    import torch

    from stable_diffusion import devices

    start = time.perf_counter()
    if not (args.model / "model_index.json").is_file():
        log(f"building the random full-size SD 1.5 at {args.model} (once)")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_full_size.py"), "--out", str(args.model)], check=True)
    for file in sorted(args.model.rglob("*.safetensors")):  # warm the page cache: every loader reads from memory
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    description = machine()
    log(f"machine: {json.dumps(description)}")
    plan = [("cpu", dtype) for dtype in args.dtypes]
    if torch.cuda.is_available():
        plan.append(("cuda", "float16"))
    common = ["--model", str(args.model), "--size", str(args.size), "--small-size", str(args.small_size),
              "--steps", str(args.steps), "--reps", str(args.reps)]
    runs: dict[str, Any] = {}
    for device, dtype in plan:
        loads: dict[str, list[dict[str, Any]]] = {"ours": [], "diffusers": []}
        for rep in range(args.load_reps):
            for impl in ("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours"):
                loads[impl].append(_child([*common, "--child", "load", "--impl", impl, "--device", device, "--dtype", dtype]))
                log(f"  {device} {dtype} load {impl}: {loads[impl][-1]['load_s']:.2f} s, "
                     f"peak RSS {loads[impl][-1]['peak_rss_after_use_mib']:,.0f} MiB")
        images = {
            "none": [],
            "all": ["ours", "diffusers"],
            "default": ["ours", "diffusers"] if device == "cuda" or dtype == "float32" else ["ours"],
        }[args.whole_images]
        compute = _child([*common, "--child", "compute", "--device", device, "--dtype", dtype, "--images", *images])
        runs[f"{device}/{dtype}"] = {"load": loads, "compute": compute}
    app_dtype = str(devices.default_dtype("cpu")).removeprefix("torch.")
    summary = summarize(runs, size=args.size, steps=args.steps, app_steps=args.app_steps, app_dtype=app_dtype)
    settings = {key: getattr(args, key) for key in ("size", "small_size", "steps", "app_steps", "reps", "load_reps")}
    settings["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings["wall_s"] = time.perf_counter() - start
    table = markdown(summary, description, settings)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": description, "settings": settings, "summary": summary, "runs": runs}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    log(f"wrote {args.out.with_suffix('.json')} and .md ({settings['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
