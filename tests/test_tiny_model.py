"""The shipped tiny model (models/tiny-shapes) still loads, draws what it is asked, and obeys guidance.

A few images at few steps on the CPU, scored by the deterministic analyzer; the full table comes
from ``benchmarks/score_tiny.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from stable_diffusion import __main__ as cli
from stable_diffusion.hub import load
from tiny_shapes.scoring import parse_caption, score

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-shapes"
PROMPTS = [
    "a red circle on a blue background",  # held out from training
    "a yellow triangle on a black background",  # held out
    "a white square on a green background",
    "a green circle on a purple background",
    "a blue triangle on a white background",
    "a black square on a yellow background",
]
# The shipped model scores well above these (see benchmarks/score_tiny.py); they catch a broken
# model or pipeline, not a slightly worse one.
FLOOR_ALL = 0.75
FLOOR_COLOR = 0.9


@pytest.fixture(scope="module")
def pipe():
    return load(MODEL, device="cpu", dtype=torch.float32)


def test_layout_and_tokenizer_files():
    for path in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (MODEL / path).is_file(), path
    size = sum(p.stat().st_size for p in MODEL.rglob("*.safetensors"))
    assert size < 12 * 2**20, f"{size / 2**20:.1f} MiB of weights: the tiny model should stay a few MB"
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    assert len(tokenizer("a purple triangle on a black background").input_ids) == 9


def test_generates_the_prompted_shapes_with_guidance(pipe):
    results = []
    for prompt in PROMPTS:
        images = pipe.text_to_image(prompt, steps=12, guidance_scale=4.0, seed=0, num_images=2).images
        assert all(image.size == (pipe.native_size, pipe.native_size) for image in images)
        results += [score(image, parse_caption(prompt)) for image in images]
    accuracy = {part: sum(r[part] for r in results) / len(results) for part in ("color", "all")}
    assert accuracy["all"] >= FLOOR_ALL and accuracy["color"] >= FLOOR_COLOR, accuracy


def test_command_line_draws_with_the_tiny_model(tmp_path):
    out = tmp_path / "circle.png"
    assert cli.main(["a red circle on a blue background", "--model", str(MODEL), "-o", str(out), "--steps", "12",
                     "--seed", "1", "--guidance-scale", "4", "--dtype", "float32", "--device", "cpu", "-q"]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (32, 32)
        assert score(image, parse_caption("a red circle on a blue background"))["color"]
