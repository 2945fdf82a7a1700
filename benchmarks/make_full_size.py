"""Write Stable Diffusion 1.5's full-size networks, with random weights, in the diffusers layout.

The networks are diffusers' / transformers' reference classes built from the real SD 1.5 Hub
configs in tests/fixtures, so the files have the real names, shapes and sizes (4.3 GB in float32)
without downloading anything. ``bench_load.py`` loads them.

    python benchmarks/make_full_size.py            # -> benchmarks/cache/sd15-random (git-ignored)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HUB_LAYOUT = ROOT / "tests" / "fixtures" / "hub-layouts" / "stable-diffusion-v1-5"
DEFAULT_OUT = ROOT / "benchmarks" / "cache" / "sd15-random"


def make_full_size(out: Path, *, seed: int = 0) -> Path:
    """Builds and saves the model unless ``out`` already holds one; returns ``out``."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(json.loads((HUB_LAYOUT / "unet" / "config.json").read_text())),
        vae=AutoencoderKL.from_config(json.loads((HUB_LAYOUT / "vae" / "config.json").read_text())),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(HUB_LAYOUT / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(HUB_LAYOUT / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(HUB_LAYOUT / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)  # diffusers' default: safetensors, one file per network
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    out = make_full_size(args.out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"{out}: {size / 2**30:.2f} GiB of weights ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
