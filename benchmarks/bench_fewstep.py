"""Time to a 512² image with few-step models: ours against diffusers, alternating in one process.

    python benchmarks/bench_fewstep.py            # writes benchmarks/results/fewstep.{json,md}
    python benchmarks/bench_fewstep.py --quick    # a smoke test of the script (128², one repetition)

What runs (the models are built once by ``make_full_size.py``, random weights of the real shapes):

* the CPU precision probe (``devices.fastest_cpu_dtype``) in a fresh process with an empty cache:
  its decision, the op-mix timings and its wall time; then the cached answer in another process;
* for each case and precision, one process loads ours and diffusers' pipeline and makes ``--reps``
  whole images with each, alternating (who goes first alternates too), after one untimed image
  each. Prompt encoding, sampling and decoding are all inside the time:
  - ``sd-turbo``: SD-Turbo's architecture (SD 2.1-base networks, its scheduler file), 1 step,
    guidance 0, tiny decoder (TAESD); diffusers: ``StableDiffusionPipeline`` with
    ``EulerAncestralDiscreteScheduler.from_config`` and ``AutoencoderTiny`` as its VAE;
  - ``lcm``: an LCM-distilled SD 1.5 (guidance embedding), 4 steps, guidance 8, tiny decoder;
    diffusers: ``LatentConsistencyModelPipeline`` with ``AutoencoderTiny``;
* ours' parts in the same process: the prompt encoding, one UNet call, the tiny decode;
* both the wall time and the process's CPU time (the second is less disturbed by other processes
  on a shared machine), the largest pixel difference of the two images, and the load average
  before and after.

bfloat16 is skipped where the probe found it emulated (no bf16 instructions): a 512² image would take
tens of minutes. On a noisy machine read the ratios (same process, alternating), not the seconds.
``--compile`` adds a run of SD-Turbo with our UNet compiled (``torch.compile`` with frozen weights,
the opt-in recipe of benchmarks/README.md); its first, untimed image includes the compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_full_size import default_out  # noqa: E402
from run import bench_threads, log, machine, run_child  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "a cinematic photo of a red fox in the snow, golden hour"
SEED = 0
# case: (model, steps, guidance scale, our sampler)
CASES = {"sd-turbo": ("sd-turbo", 1, 0.0, "euler_a"), "lcm": ("lcm", 4, 8.0, "lcm")}


# ------------------------------------------------------------------------------- the two models
class Ours:
    """Our pipeline; with ``conv="onednn"``, every convolution by oneDNN (``SD_CPU_CONV``) instead of the
    algorithm ``cpu_conv`` measured fastest for its shape: the same weights, to show what the choice gains."""

    def __init__(self, case: str, *, dtype, compile_unet: bool = False, conv: str | None = None) -> None:
        import stable_diffusion
        import torch

        self.name, self.conv = ("ours", None) if conv is None else (f"ours ({conv} only)", conv)
        model, self.steps, self.guidance, self.sampler = CASES[case]
        self.pipe = stable_diffusion.load(default_out(model), device="cpu", dtype=dtype, tiny_vae=default_out("taesd"))
        if compile_unet:
            # The opt-in recipe of benchmarks/README.md: inductor with the weights frozen into the
            # graph (compiled at the first image, again for every new shape or thread count).
            self.pipe.unet = torch.compile(self.pipe.unet, options={"freezing": True})

    def image(self, size: int):
        from stable_diffusion.cpu_conv import CPU_CONV_ENV

        with environment(CPU_CONV_ENV, self.conv):
            return self.pipe.text_to_image(PROMPT, width=size, height=size, steps=self.steps, guidance_scale=self.guidance,
                                           sampler=self.sampler, decoder="tiny", seed=SEED).images[0]

    def parts(self, size: int) -> dict[str, Callable[[], Any]]:
        import torch

        from stable_diffusion.layers import guidance_scale_embedding

        pipe, dtype = self.pipe, self.pipe.dtype
        generator = torch.Generator().manual_seed(SEED)
        x = torch.randn(1, 4, size // 8, size // 8, generator=generator)
        context = pipe.encode_prompt(PROMPT).to(dtype)
        dim = pipe.unet.config.time_cond_proj_dim
        cond = None if dim is None else guidance_scale_embedding(torch.tensor([self.guidance - 1]), dim).to(dtype)
        from stable_diffusion.cpu_conv import CPU_CONV_ENV

        def unet_call() -> torch.Tensor:
            return pipe.unet(x.to(dtype), torch.tensor([999.0]), context, timestep_cond=cond)

        def unet_call_onednn() -> torch.Tensor:
            with environment(CPU_CONV_ENV, "onednn"):
                return unet_call()

        return {
            "prompt encoding": lambda: pipe.encode_prompt(PROMPT),
            "UNet call": unet_call,
            "UNet call, oneDNN only": unet_call_onednn,
            "tiny decode": lambda: pipe.decode(x, decoder="tiny"),
        }


class Diffusers:
    name = "diffusers"

    def __init__(self, case: str, *, dtype) -> None:
        import diffusers
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        model, self.steps, self.guidance, _ = CASES[case]
        pipeline = diffusers.LatentConsistencyModelPipeline if case == "lcm" else diffusers.StableDiffusionPipeline
        tiny = diffusers.AutoencoderTiny.from_pretrained(default_out("taesd"), torch_dtype=dtype)
        self.pipe = pipeline.from_pretrained(default_out(model), vae=tiny, torch_dtype=dtype, safety_checker=None,
                                             requires_safety_checker=False)
        if case == "sd-turbo":
            self.pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def image(self, size: int):
        import torch

        return self.pipe(PROMPT, height=size, width=size, num_inference_steps=self.steps, guidance_scale=self.guidance,
                         generator=torch.Generator().manual_seed(SEED)).images[0]


@contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (nothing when value is None)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


# ------------------------------------------------------------------------------------- children
def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def child_images(case: str, dtype_name: str, *, size: int, reps: int, compile_unet: bool) -> dict[str, Any]:
    """One process, both pipelines, whole images alternating; then ours' parts."""
    import numpy as np
    import torch

    torch.set_num_threads(bench_threads())
    dtype = getattr(torch, dtype_name)
    models = [Ours(case, dtype=dtype, compile_unet=compile_unet), Diffusers(case, dtype=dtype)]
    if not compile_unet:  # under torch.compile every convolution is oneDNN's anyway
        models.insert(1, Ours(case, dtype=dtype, conv="onednn"))
    times: dict[str, dict[str, list[float]]] = {m.name: {"wall_s": [], "cpu_s": []} for m in models}
    images, first_image_s = {}, {}
    # Untimed: touches every weight, lets oneDNN build its kernels (and compiles); ours' first image
    # also times each new convolution shape (the parent gives every child an empty cache).
    for model in models:
        first_image_s[model.name], _, images[model.name] = _timed(lambda: model.image(size))
    for rep in range(reps):
        for model in models if rep % 2 == 0 else reversed(models):
            wall, cpu, images[model.name] = _timed(lambda: model.image(size))
            times[model.name]["wall_s"].append(wall)
            times[model.name]["cpu_s"].append(cpu)
            log(f"  {case} {dtype_name} {model.name}: {wall:.2f} s (CPU {cpu:.2f} s)")
    pixels = {name: np.asarray(image, dtype=np.int16) for name, image in images.items()}
    calls = models[0].parts(size)
    parts: dict[str, list[float]] = {part: [] for part in calls}
    parts_cpu: dict[str, list[float]] = {part: [] for part in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(reps):  # interleaved, so that the machine's drift hits every part alike
            for part, call in calls.items():
                wall, cpu, _ = _timed(call)
                parts[part].append(wall)
                parts_cpu[part].append(cpu)
    from stable_diffusion import cpu_conv, devices

    choices = devices.read_probe_cache(devices.probe_cache_file(cpu_conv.CACHE_FILE)).get(devices.machine_key(), {})
    return {"times": times, "first_image_s": first_image_s, "parts_wall_s": parts, "parts_cpu_s": parts_cpu,
            "im2col_shapes": sorted(shape for shape, algorithm in choices.items() if algorithm == "im2col"),
            "measured_shapes": len(choices),
            "max_pixel_diff": {name: int(np.abs(pixels["ours"] - pixels[name]).max()) for name in pixels if name != "ours"}}


def child_probe() -> dict[str, Any]:
    """The precision probe as a first start on this machine runs it (the cache folder comes from the parent)."""
    import torch

    torch.set_num_threads(bench_threads())
    from stable_diffusion import devices

    start = time.perf_counter()
    dtype = devices.fastest_cpu_dtype()
    seconds = time.perf_counter() - start
    cache = json.loads(devices.probe_cache_file().read_text()) if devices.probe_cache_file().is_file() else {}
    return {"dtype": str(dtype).removeprefix("torch."), "seconds": seconds, "cache": cache}


# --------------------------------------------------------------------------------------- parent
def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    return run_child(__file__, args, env)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def measure_probe() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        env = {key: value for key, value in os.environ.items() if key != "SD_CPU_DTYPE"}
        env["XDG_CACHE_HOME"] = cache
        first = _child(["--child", "probe"], env)
        cached = _child(["--child", "probe"], env)
    entry = next(iter(first["cache"].values()), {})
    return {"dtype": first["dtype"], "probe_s": first["seconds"], "cached_s": cached["seconds"],
            "float32_mix_s": entry.get("float32_s"), "bfloat16_mix_s": entry.get("bfloat16_s")}


def precisions(probe: dict[str, Any]) -> list[str]:
    """float32, and bfloat16 unless the probe found it emulated (``devices.EMULATED_SLOWDOWN``)."""
    from stable_diffusion import devices

    emulated = probe["bfloat16_mix_s"] > devices.EMULATED_SLOWDOWN * probe["float32_mix_s"]
    return ["float32"] if emulated else ["float32", "bfloat16"]


def ensure_models() -> None:
    for model in ("taesd", *sorted({model for model, *_ in CASES.values()})):
        if not default_out(model).is_dir():
            log(f"building the random {model} at {default_out(model)} (once)")
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_full_size.py"), "--model", model], check=True)


def summarize(runs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, run in runs.items():
        case, dtype, *compiled = key.split("/")
        medians = {name: {metric: statistics.median(values) for metric, values in by_metric.items()}
                   for name, by_metric in run["times"].items()}
        ours, theirs = medians["ours"], medians["diffusers"]
        onednn = medians.get("ours (onednn only)", {})
        rows.append({
            "case": case, "dtype": dtype, "compiled": bool(compiled), "n": len(run["times"]["ours"]["wall_s"]),
            "first_image_s": run["first_image_s"],
            "ours_s": ours["wall_s"], "diffusers_s": theirs["wall_s"], "ratio": ours["wall_s"] / theirs["wall_s"],
            "ours_cpu_s": ours["cpu_s"], "diffusers_cpu_s": theirs["cpu_s"],
            "cpu_ratio": ours["cpu_s"] / theirs["cpu_s"], "max_pixel_diff": run["max_pixel_diff"],
            "ours_onednn_s": onednn.get("wall_s"), "ours_onednn_cpu_s": onednn.get("cpu_s"),
            "parts_s": {part: statistics.median(values) for part, values in run["parts_wall_s"].items()},
            "parts_cpu_s": {part: statistics.median(values) for part, values in run["parts_cpu_s"].items()},
            "im2col_shapes": run["im2col_shapes"], "measured_shapes": run["measured_shapes"],
        })
    return rows


def markdown(rows: list[dict[str, Any]], probe: dict[str, Any], description: dict[str, Any], settings: dict[str, Any]) -> str:
    size = settings["size"]
    lines = [
        f"Machine: {description['cpu']}, {description['cpu_cores']} cores ({description['threads']} threads), "
        f"{description['memory_gib']} GiB RAM; AVX512-BF16 {'yes' if description['avx512_bf16'] else 'no'}, "
        f"AMX {'yes' if description['amx'] else 'no'}. torch {description['torch']}, diffusers {description['diffusers']}. "
        f"{settings['date']}, {settings['wall_s'] / 60:.0f} min; load average (1, 5, 15 min) before "
        f"{settings['load_before']}, after {settings['load_after']}.",
        "",
        f"Precision probe: **{probe['dtype']}** (op mix float32 {1e3 * probe['float32_mix_s']:.2f} ms, bfloat16 "
        f"{1e3 * probe['bfloat16_mix_s']:.2f} ms); the probe took {probe['probe_s']:.2f} s in a fresh process, the "
        f"cached answer {1e3 * probe['cached_s']:.1f} ms.",
        "",
        f"Time to a {size}² image, prompt encoding included, tiny decoder (TAESD); medians of {settings['reps']} "
        f"({settings['lcm_reps']} for LCM) alternating runs in one process, after one untimed image each; CPU = the "
        "process's CPU time. *oneDNN only*: ours with every convolution by oneDNN (`SD_CPU_CONV=onednn`) instead of "
        "the algorithm measured fastest per shape (`stable_diffusion/cpu_conv.py`). *First image*: ours' untimed "
        "first image in a process with an empty cache, which times each new convolution shape.",
        "",
        "| case | dtype | ours | ours, oneDNN only | diffusers | ours / diffusers | ours / oneDNN only | ours CPU "
        "| diffusers CPU | CPU ratio | first image | max pixel diff (vs oneDNN only, vs diffusers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        default = " (default)" if row["dtype"] == probe["dtype"] else ""
        compiled = f", ours compiled ({row['first_image_s']['ours']:.0f} s)" if row["compiled"] else ""
        onednn_s, diffs = row["ours_onednn_s"], row["max_pixel_diff"]
        lines.append(
            f"| {CASE_LABELS[row['case']]}{compiled} | {row['dtype']}{default} | {row['ours_s']:.2f} s | "
            + (f"{onednn_s:.2f} s" if onednn_s else "–") + f" | {row['diffusers_s']:.2f} s | {row['ratio']:.2f} | "
            + (f"{row['ours_s'] / onednn_s:.2f}" if onednn_s else "–")
            + f" | {row['ours_cpu_s']:.2f} s | {row['diffusers_cpu_s']:.2f} s | {row['cpu_ratio']:.2f} | "
            f"{row['first_image_s']['ours']:.2f} s | {diffs.get('ours (onednn only)', '–')}, {diffs['diffusers']} |"
        )
    parts = list(rows[0]["parts_s"]) if rows else []
    lines += ["", "Ours, part by part (medians of interleaved runs, wall; CPU time in brackets):", "",
              "| case | dtype | " + " | ".join(parts) + " | UNet call / oneDNN only (CPU) |",
              "|---|---|" + "---:|" * (len(parts) + 1)]
    for row in rows:
        compiled = ", compiled" if row["compiled"] else ""
        cpu = row["parts_cpu_s"]
        lines.append(f"| {CASE_LABELS[row['case']]}{compiled} | {row['dtype']} | "
                     + " | ".join(f"{row['parts_s'][part]:.2f} s ({cpu[part]:.2f} s)" for part in parts)
                     + f" | {cpu['UNet call'] / cpu['UNet call, oneDNN only']:.2f} |")
    lines += ["", "Convolution shapes that the first image timed, and those that went to im2col:", ""]
    lines += [f"- {CASE_LABELS[row['case']]}, {row['dtype']}: {len(row['im2col_shapes'])} of {row['measured_shapes']}: "
              + ", ".join(f"`{shape}`" for shape in row["im2col_shapes"]) for row in rows if not row["compiled"]]
    return "\n".join(lines) + "\n"


CASE_LABELS = {"sd-turbo": "SD-Turbo, 1 step", "lcm": "LCM (distilled SD 1.5), 4 steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5, help="timed images per implementation")
    parser.add_argument("--lcm-reps", type=int, default=3, help="the same for the 4-step LCM case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", help="default: float32, and bfloat16 unless emulated")
    parser.add_argument("--compile", action="store_true",
                        help="also run SD-Turbo with our UNet compiled (torch.compile, frozen weights; minutes to compile)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 128², one repetition")
    parser.add_argument("--out", type=Path, default=RESULTS / "fewstep", help="writes OUT.json and OUT.md")
    parser.add_argument("--child", choices=["images", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.reps, args.lcm_reps = 128, 1, 1
    if args.child == "probe":
        print(json.dumps(child_probe()))
        return
    if args.child == "images":
        print(json.dumps(child_images(args.case, args.dtype, size=args.size, reps=args.reps, compile_unet=args.compiled)))
        return
    start, load_before = time.perf_counter(), load_average()
    ensure_models()
    probe = measure_probe()
    log(f"probe: {probe}")
    plan = [(case, dtype, False) for case in args.cases for dtype in args.dtypes or precisions(probe)]
    if args.compile:
        plan.append(("sd-turbo", probe["dtype"], True))
    runs = {}
    for case, dtype, compiled in plan:
        reps = args.lcm_reps if case == "lcm" else args.reps
        command = ["--child", "images", "--case", case, "--dtype", dtype, "--size", str(args.size), "--reps", str(reps)]
        with tempfile.TemporaryDirectory() as cache:  # no convolution shape measured yet
            env = {**os.environ, "XDG_CACHE_HOME": cache}
            env.pop("SD_CPU_CONV", None)
            runs[f"{case}/{dtype}" + ("/compiled" if compiled else "")] = _child(command + ["--compiled"] * compiled, env)
    settings = {"size": args.size, "reps": args.reps, "lcm_reps": args.lcm_reps, "load_before": load_before, "load_after": load_average(),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start}
    description = machine()
    rows = summarize(runs)
    table = markdown(rows, probe, description, settings)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": description, "settings": settings, "probe": probe, "rows": rows, "runs": runs}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
