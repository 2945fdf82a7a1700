"""Time the app's first SD-Turbo image on this machine: real-shape random weights, chosen in the picker.

The "Done when" check of the app's few-step defaults: SD-Turbo's networks (SD 2.1-base's shapes,
random weights, from the real configs in tests/fixtures) with SD-Turbo's own scheduler file, and a
random TAESD of the real shape, are written once under benchmarks/cache/ (git-ignored, 5.2 GB).
The script starts ``app.py`` on a tiny model with ``--tiny-vae`` pointing at that TAESD, picks the
SD-Turbo folder with the picker's ``/load_model``, then times 512x512 images through
``gradio_client`` at the defaults the page offers after the switch (1 step, guidance 0, Euler a,
tiny decoder), each with its live preview:

    python benchmarks/bench_app_turbo.py              # prints the timings and the machine's load

The app runs with the CPU's default precision, as a visitor's server would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from stable_diffusion.hub import save  # noqa: E402
from stable_diffusion.pipelines import StableDiffusion  # noqa: E402
from stable_diffusion.schedules import SchedulerConfig  # noqa: E402
from stable_diffusion.taesd import TAESDConfig, TinyAutoencoder  # noqa: E402
from stable_diffusion.unet import UNet, UNetConfig  # noqa: E402
from stable_diffusion.vae import AutoencoderKL, VAEConfig  # noqa: E402
from stable_diffusion.weights import ours_to_hub  # noqa: E402
from webui.models import FEW_STEP  # noqa: E402

HUB_LAYOUTS = ROOT / "tests" / "fixtures" / "hub-layouts"
CACHE = ROOT / "benchmarks" / "cache"
SCHEDULER_FILE = "scheduler/scheduler_config.json"


def _config(network: str) -> dict:
    return json.loads((HUB_LAYOUTS / "stable-diffusion-2-1-base" / network / "config.json").read_text())


def make_sd_turbo(out: Path) -> Path:
    """SD-Turbo's shapes with random weights in the diffusers layout, unless ``out`` holds it already."""
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    pipe = StableDiffusion(
        text_encoder=CLIPTextModel(CLIPTextConfig.from_hub_config(_config("text_encoder"))).eval(),
        unet=UNet(UNetConfig.from_hub_config(_config("unet"))).eval(),
        vae=AutoencoderKL(VAEConfig.from_hub_config(_config("vae"))).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(HUB_LAYOUTS / "stable-diffusion-2-1-base" / "tokenizer"),
        scheduler=SchedulerConfig(),
        name="sd-turbo-random",
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(pipe, partial)
    # SD-Turbo's own scheduler file (Euler, trailing spacing), byte for byte.
    shutil.copyfile(HUB_LAYOUTS / "sd-turbo" / SCHEDULER_FILE, partial / SCHEDULER_FILE)
    partial.rename(out)
    return out


def make_taesd(out: Path) -> Path:
    """madebyollin/taesd's shape with random weights, in diffusers' AutoencoderTiny layout."""
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = TAESDConfig.sd()
    tiny = TinyAutoencoder(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in ours_to_hub("taesd", tiny.state_dict()).items()}
    save_file(tensors, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hub_config(), indent=2) + "\n")
    return out


def machine() -> str:
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


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
        if first_preview is None and job.outputs():
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
    turbo = make_sd_turbo(CACHE / "sd-turbo-shaped-random")
    taesd = make_taesd(CACHE / "taesd-shaped-random")
    print(f"models ready in {time.perf_counter() - start:.0f} s")
    print(f"machine: {machine()}")
    time_app(turbo, taesd, repeats=args.repeats)


if __name__ == "__main__":
    main()
