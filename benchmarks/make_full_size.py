"""Write full-size Stable Diffusion models, with random weights, in the diffusers layout.

The networks are diffusers' / transformers' reference classes built from the real Hub configs in
tests/fixtures, so the files have the real names, shapes and sizes without downloading anything:

* ``sd15``: Stable Diffusion 1.5 (4.3 GB in float32), its own scheduler file;
* ``sd-turbo``: SD-Turbo's architecture, SD 2.1-base's networks (5.2 GB), with SD-Turbo's
  scheduler file (Euler, trailing spacing);
* ``lcm``: an LCM-distilled SD 1.5 (LCM_Dreamshaper_v7's shape: the UNet takes a 256-wide
  guidance embedding), with an LCM scheduler file;
* ``taesd``: the tiny autoencoder TAESD (``madebyollin/taesd``'s config, 10 MB).

    python benchmarks/make_full_size.py                  # sd15 -> benchmarks/cache/sd15-random
    python benchmarks/make_full_size.py --model sd-turbo # -> benchmarks/cache/sd-turbo-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HUB_LAYOUTS = ROOT / "tests" / "fixtures" / "hub-layouts"
CACHE = ROOT / "benchmarks" / "cache"
# (network configs' repo, scheduler file's repo, extra UNet config)
MODELS = {
    "sd15": ("stable-diffusion-v1-5", "stable-diffusion-v1-5", {}),
    "sd-turbo": ("stable-diffusion-2-1-base", "sd-turbo", {}),
    "lcm": ("stable-diffusion-v1-5", "stable-diffusion-v1-5", {"time_cond_proj_dim": 256}),
}
# An LCM-distilled model's own scheduler file: LCM_Dreamshaper_v7's LCM keys on SD 1.5's file.
LCM_SCHEDULER_KEYS = {
    "_class_name": "LCMScheduler",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
}


def default_out(model: str) -> Path:
    return CACHE / f"{model}-random"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_atomically(out: Path, save) -> Path:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    partial.rename(out)
    return out


def make_full_size(out: Path, *, model: str = "sd15", seed: int = 0) -> Path:
    """Builds and saves ``model`` unless ``out`` already holds one; returns ``out``."""
    import diffusers
    from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (out / "model_index.json").is_file() or (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    if model == "taesd":
        return _write_atomically(out, AutoencoderTiny().save_pretrained)
    networks, scheduler_repo, unet_extra = MODELS[model]
    layout = HUB_LAYOUTS / networks
    scheduler = _read_json(HUB_LAYOUTS / scheduler_repo / "scheduler" / "scheduler_config.json")
    if model == "lcm":
        scheduler.update(LCM_SCHEDULER_KEYS)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config({**_read_json(layout / "unet" / "config.json"), **unet_extra}),
        vae=AutoencoderKL.from_config(_read_json(layout / "vae" / "config.json")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(layout / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(layout / "tokenizer"),
        scheduler=getattr(diffusers, scheduler["_class_name"]).from_config(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

    def save(folder: Path) -> None:
        pipe.save_pretrained(folder)  # diffusers' default: safetensors, one file per network
        # The model's own scheduler file, as on the Hub (not the class's defaults that save_pretrained writes).
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")

    return _write_atomically(out, save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "taesd"], default="sd15")
    parser.add_argument("--out", type=Path, help="default: benchmarks/cache/MODEL-random")
    args = parser.parse_args()
    start = time.perf_counter()
    out = make_full_size(args.out or default_out(args.model), model=args.model)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"{out}: {size / 2**30:.2f} GiB of weights ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
