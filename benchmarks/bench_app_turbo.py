"""Time the app's SD-Turbo images on this machine: real-shape random weights, as a new Space gets them.

The "Done when" check of the app's few-step defaults: SD-Turbo's networks (SD 2.1-base's shapes,
random weights, from the real configs in tests/fixtures) with SD-Turbo's own scheduler file, and a
random TAESD of the real shape, written once under benchmarks/cache/ by make_full_size.py (5.2 GB).
Each app starts with an empty cache folder (``XDG_CACHE_HOME``), as a Space's new container does,
so the CPU measurements (precision, convolution algorithms) start from nothing:

* **started on SD-Turbo** (a CPU's default model): the app warms up with one image of its own
  before serving (``webui.models.warm_up``); the script waits for it, then times the images;
* **switched to SD-Turbo** in the picker of an app started on a tiny model: the first image after
  the switch times the new convolution shapes.

Images are 512x512 through ``gradio_client`` at the defaults the page offers for SD-Turbo (1 step,
guidance 0, Euler a, tiny decoder), each with its live previews (in a 1-step run the preview pane
shows the finished picture before the gallery's files arrive: its only x̂0 is the image, which the
app does not decode twice); then one image at 2 steps and one at 1 step with the full decoder, each
previewed by the tiny decoder before the image:

    python benchmarks/bench_app_turbo.py    # prints the timings -> benchmarks/results/app-turbo.md

The app runs with the CPU's default precision, as a visitor's server would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from make_full_size import default_out, make_full_size  # noqa: E402
from run import machine  # noqa: E402
from PIL import Image  # noqa: E402

from webui.models import FEW_STEP  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "app-turbo.md"
_report: list[str] = []


def report(line: str) -> None:
    """Print ``line`` and keep it for the results file."""
    print(line, flush=True)
    _report.append(line)


def time_app(turbo: Path, taesd: Path, *, repeats: int) -> None:
    from gradio_client import Client
    from test_app import make_tiny_model, wait_for

    with tempfile.TemporaryDirectory(prefix="bench-app-") as scratch:
        folder = Path(scratch)
        tiny = make_tiny_model(folder / "tiny-random")
        settings = dict(sampler=FEW_STEP.sampler, steps=FEW_STEP.steps, guidance_scale=FEW_STEP.guidance_scale,
                        width=512, height=512, decoder="tiny")

        report("started on SD-Turbo:")
        log = folder / "started.log"
        with app_with_empty_cache(folder / "cache-started", taesd, "--model", str(turbo), log=log) as (url, started):
            report(f"  answering {time.perf_counter() - started:.1f} s after start")
            wait_for(lambda: "Warmed up" in log.read_text(), "the warm-up image", timeout=600)
            report(f"  warmed up {time.perf_counter() - started:.1f} s after start: "
                  + next(line for line in log.read_text().splitlines() if "Warmed up" in line).split(": ", 1)[1])
            client = Client(url, verbose=False, download_files=str(folder / "downloads"))
            for repeat in range(repeats):
                time_one_image(client, settings, seed=repeat)
            report("  with something to preview before the image (the live preview shows the tiny decoder's x̂0):")
            time_one_image(client, {**settings, "steps": 2}, seed=0)
            time_one_image(client, {**settings, "decoder": "full"}, seed=0)

        report("switched to SD-Turbo in the picker:")
        with app_with_empty_cache(folder / "cache-switched", taesd, "--model", str(tiny), log=folder / "switched.log") as (
                url, _started):
            client = Client(url, verbose=False, download_files=str(folder / "downloads"))
            start = time.perf_counter()
            _title, header = client.predict(str(turbo), api_name="/load_model")
            report(f"  switch to {turbo.name}: {time.perf_counter() - start:.1f} s; load average {os.getloadavg()}")
            report("  " + header.splitlines()[-1])
            for repeat in range(repeats):
                time_one_image(client, settings, seed=repeat)


@contextlib.contextmanager
def app_with_empty_cache(cache: Path, taesd: Path, *args: str, log: Path) -> Iterator[tuple[str, float]]:
    """``app.py ARGS`` with the tiny decoder, all the cores and nothing measured yet; yields (URL, start time)."""
    from test_app import serve_app

    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))  # the Hub's cache stays put
    try:
        started = time.perf_counter()
        with serve_app(*args, "--device", "cpu", "--tiny-vae", str(taesd), log=log, threads=None) as url:
            yield url, started
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = saved


def time_one_image(client, settings: dict, *, seed: int) -> None:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    job = client.submit("a cinematic photo of a fox", "", settings["sampler"], settings["steps"],
                        settings["guidance_scale"], settings["width"], settings["height"], seed, 1,
                        settings["decoder"], api_name="/text_to_image")
    first_preview = None
    while not job.done():
        if first_preview is None and any(isinstance(output[1], str) for output in job.outputs()):
            first_preview = time.perf_counter() - start
        time.sleep(0.02)
    gallery, _preview, parameters = job.result()
    seconds = time.perf_counter() - start
    previews = [output for output in job.outputs()[:-1] if isinstance(output[1], str)]
    size = Image.open(gallery[0]["image"]).size
    shown = "none" if first_preview is None else f"{first_preview:.1f} s"
    report(f"  image {size[0]}x{size[1]} in {seconds:.1f} s (first preview at {shown}, {len(previews)} previews); "
          f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    report("    " + parameters.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="images to time after the switch")
    args = parser.parse_args()
    start = time.perf_counter()
    turbo = make_full_size(default_out("sd-turbo"), model="sd-turbo")
    taesd = make_full_size(default_out("taesd"), model="taesd")
    report(f"models ready in {time.perf_counter() - start:.0f} s")
    description = machine()
    report(f"machine: {description['cpu']}, {description['cpu_cores']} cores, torch {description['torch']}")
    report(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()}")
    time_app(turbo, taesd, repeats=args.repeats)
    RESULTS.write_text("Output of `python benchmarks/bench_app_turbo.py`:\n\n```\n" + "\n".join(_report) + "\n```\n")


if __name__ == "__main__":
    main()
