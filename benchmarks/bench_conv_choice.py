"""What the measured convolution choice (``stable_diffusion/cpu_conv.py``) gains, in a process as users run one.

    python benchmarks/bench_conv_choice.py sd-turbo --reps 3   # -> benchmarks/results/conv-choice-sd-turbo.json
    python benchmarks/bench_conv_choice.py lcm --reps 3

One process holds only our pipeline (as the app and the command line do; ``bench_fewstep.py`` holds
three, which changes how the allocator serves oneDNN's per-call weight reorder), starts from an
empty cache (its first, untimed image times each convolution shape), then makes whole 512² images
alternating ``SD_CPU_CONV=onednn`` (every convolution by oneDNN, as torch and diffusers run them)
and the measured choice. Reported: wall and CPU seconds per image, minor page faults, the medians'
ratio, and which shapes went to im2col. Random weights of the real shapes, from ``make_full_size.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fewstep import CASES, PROMPT, SEED  # noqa: E402
from make_full_size import default_out  # noqa: E402
from run import bench_threads, log, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("--reps", type=int, default=3, help="timed images per variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache  # before the package reads it: no shape measured yet
        report = measure(args.case, args.reps)
    out = ROOT / "benchmarks" / "results" / f"conv-choice-{args.case}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


def measure(case: str, reps: int) -> dict:
    import torch

    import stable_diffusion
    from stable_diffusion import cpu_conv, devices

    torch.set_num_threads(bench_threads())
    model, steps, guidance, sampler = CASES[case]
    pipe = stable_diffusion.load(default_out(model), device="cpu", dtype=torch.float32, tiny_vae=default_out("taesd"))

    def image() -> None:
        pipe.text_to_image(PROMPT, width=512, height=512, steps=steps, guidance_scale=guidance, sampler=sampler,
                           decoder="tiny", seed=SEED)

    os.environ.pop(cpu_conv.CPU_CONV_ENV, None)
    start = time.perf_counter()
    image()
    first_image_s = time.perf_counter() - start
    runs: dict[str, list[dict]] = {"onednn": [], "measured": []}
    for rep in range(reps):
        for variant in ("onednn", "measured") if rep % 2 == 0 else ("measured", "onednn"):
            os.environ[cpu_conv.CPU_CONV_ENV] = "onednn" if variant == "onednn" else "measure"
            faults, wall, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
            image()
            run = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                   "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}
            runs[variant].append(run)
            log(f"  {case} {variant}: {run['wall_s']:.2f} s (CPU {run['cpu_s']:.2f} s, {run['minor_faults']} page faults)")
    medians = {variant: {key: statistics.median(run[key] for run in variant_runs) for key in variant_runs[0]}
               for variant, variant_runs in runs.items()}
    choices = devices.read_probe_cache(devices.probe_cache_file(cpu_conv.CACHE_FILE)).get(devices.machine_key(), {})
    return {
        "machine": machine(), "case": case, "reps": reps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "first_image_s": first_image_s, "medians": medians,
        "cpu_ratio": medians["measured"]["cpu_s"] / medians["onednn"]["cpu_s"],
        "wall_ratio": medians["measured"]["wall_s"] / medians["onednn"]["wall_s"],
        "im2col_shapes": sorted(shape for shape, algorithm in choices.items() if algorithm == "im2col"),
        "measured_shapes": len(choices), "runs": runs,
    }


if __name__ == "__main__":
    main()
