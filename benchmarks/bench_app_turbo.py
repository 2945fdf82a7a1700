"""Time the app's first SD-Turbo image on this machine: real-shape random weights, chosen in the picker.

The "Done when" check of the app's few-step defaults: SD-Turbo's networks (SD 2.1-base's shapes,
random weights, from the real configs in tests/fixtures) with SD-Turbo's own scheduler file, and a
random TAESD of the real shape, written once under benchmarks/cache/ by make_full_size.py (5.2 GB).
The script starts ``app.py`` on a tiny model with ``--tiny-vae`` pointing at that TAESD, picks the
SD-Turbo folder with the picker's ``/load_model``, then times 512x512 images through
``gradio_client`` at the defaults the page offers after the switch (1 step, guidance 0, Euler a,
tiny decoder), each with its live previews (a 1-step run has none: its only preview would be the
image itself, which the app does not decode twice):

    python benchmarks/bench_app_turbo.py              # prints the timings and the machine's load

The app runs with the CPU's default precision, as a visitor's server would.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from make_full_size import default_out, make_full_size  # noqa: E402
from run import machine  # noqa: E402
from PIL import Image  # noqa: E402

from webui.models import FEW_STEP  # noqa: E402


def time_app(turbo: Path, taesd: Path, *, repeats: int) -> None:
    from gradio_client import Client
    from test_app import make_tiny_model, serve_app

    with tempfile.TemporaryDirectory(prefix="bench-app-") as scratch:
        folder = Path(scratch)
        tiny = make_tiny_model(folder / "tiny-random")
        # All the cores, as a server would use them (the tests run the app on one thread).
        with serve_app("--model", str(tiny), "--device", "cpu", "--tiny-vae", str(taesd),
                       log=folder / "app.log", threads=None) as url:
            client = Client(url, verbose=False, download_files=str(folder / "downloads"))
            start = time.perf_counter()
            _title, header = client.predict(str(turbo), api_name="/load_model")
            print(f"switch to {turbo.name}: {time.perf_counter() - start:.1f} s; load average {os.getloadavg()}")
            print(header.splitlines()[-1])
            # The page's defaults after the switch (tests/test_picker.py checks that it offers these).
            settings = dict(sampler=FEW_STEP.sampler, steps=FEW_STEP.steps, guidance_scale=FEW_STEP.guidance_scale,
                            width=512, height=512, decoder="tiny")
            for repeat in range(repeats):
                time_one_image(client, settings, seed=repeat)


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
    print(f"image {size[0]}x{size[1]} in {seconds:.1f} s (first preview at {shown}, {len(previews)} previews); "
          f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}")
    print("  " + parameters.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="images to time after the switch")
    args = parser.parse_args()
    start = time.perf_counter()
    turbo = make_full_size(default_out("sd-turbo"), model="sd-turbo")
    taesd = make_full_size(default_out("taesd"), model="taesd")
    print(f"models ready in {time.perf_counter() - start:.0f} s")
    description = machine()
    print(f"machine: {description['cpu']}, {description['cpu_cores']} cores, torch {description['torch']}")
    time_app(turbo, taesd, repeats=args.repeats)


if __name__ == "__main__":
    main()
