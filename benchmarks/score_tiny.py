"""Prompt-following score of the tiny shapes model, with and without classifier-free guidance.

Generates images for shapes captions, reads each back with the deterministic analyzer
(``tiny_shapes.scoring``) and counts how often the colour, the shape, the background, and
all three match the caption, on combinations seen in training and on the held-out ones. Every
guidance scale sees the same prompts and seeds, so the rows differ only by guidance. The first
rows are references: the analyzer on the dataset's own images (it should read them all), and on
their VAE round trips (what the autoencoder alone loses: small triangles come back rounded).

    python benchmarks/score_tiny.py                       # the table, and benchmarks/out/score_tiny.json
    python benchmarks/score_tiny.py --guidance 1 4 --seeds 2 --train-prompts 24   # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stable_diffusion.hub import load
from stable_diffusion.images import pil_to_tensor
from tiny_shapes.dataset import draw_scene, random_scene, split_combinations
from tiny_shapes.scoring import score

PARTS = ("color", "shape", "background", "all")


def prompt_sets(*, train_prompts: int, seed: int) -> dict[str, list]:
    """All held-out combinations, and a fixed random sample of the training ones."""
    training = split_combinations("train")
    return {"train": random.Random(seed).sample(training, min(train_prompts, len(training))),
            "held_out": split_combinations("held_out")}


def accuracy(results: list[dict[str, bool]]) -> dict[str, float]:
    counts = Counter(part for result in results for part, ok in result.items() if ok)
    return {part: counts[part] / len(results) for part in PARTS}


def reference_rows(pipe, sets: dict[str, list], *, seeds: int, resolution: int) -> dict[str, dict]:
    """The analyzer on ground-truth images of the same combinations, and on their VAE reconstructions."""
    rows = {"dataset images": {}, "VAE round trip": {}}
    for split, combinations in sets.items():
        rng = random.Random(1)
        scenes = [random_scene(rng, [c]) for c in combinations for _ in range(seeds)]
        images = [draw_scene(scene, resolution) for scene in scenes]
        rows["dataset images"][split] = accuracy([score(image, s.combination) for image, s in zip(images, scenes)])
        pixels = torch.stack([pil_to_tensor(image) for image in images]).to(pipe.device, pipe.vae_dtype)
        with torch.inference_mode():
            latents = pipe.vae.encode(pixels).mean * pipe.vae.config.scaling_factor
        decoded = pipe.decode(latents)
        rows["VAE round trip"][split] = accuracy([score(image, s.combination) for image, s in zip(decoded, scenes)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-shapes")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpmpp_2m_karras")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..n-1)")
    parser.add_argument("--train-prompts", type=int, default=36, help="training combinations sampled (held-out: all 12)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/score_tiny.json"))
    parser.add_argument("--grid", type=Path, default=Path("benchmarks/out/score_tiny_grid.png"),
                        help="held-out samples, one row per guidance scale")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    pipe = load(args.model, device="cpu", dtype=torch.float32)
    sets = prompt_sets(train_prompts=args.train_prompts, seed=0)
    table = reference_rows(pipe, sets, seeds=args.seeds, resolution=pipe.native_size)
    grid_rows = []
    timings = {}
    for guidance in args.guidance:
        row, start, count = {}, time.perf_counter(), 0
        for split, combinations in sets.items():
            results = []
            for combination in combinations:
                generation = pipe.text_to_image(
                    combination.caption, steps=args.steps, guidance_scale=guidance, sampler=args.sampler,
                    seed=0, num_images=args.seeds,
                )
                results += [score(image, combination) for image in generation.images]
                count += len(generation.images)
                if split == "held_out":
                    grid_rows.append(generation.images[0])
            row[split] = accuracy(results)
        timings[guidance] = (time.perf_counter() - start) / count
        table[f"guidance {guidance:g}"] = row

    header = f"{'':>18} | {'train: color  shape  bg    all':>31} | {'held-out: color  shape  bg    all':>34}"
    print(f"{args.model}: {args.steps} steps of {args.sampler}, {args.seeds} seeds per prompt, "
          f"{len(sets['train'])} training + {len(sets['held_out'])} held-out prompts")
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        cells = ["  ".join(f"{row[split][part]:5.0%}" for part in PARTS) for split in ("train", "held_out")]
        print(f"{name:>18} | {cells[0]:>31} | {cells[1]:>34}")
    print("seconds per image (CPU, float32): " + ", ".join(f"g={g:g}: {t:.3f}" for g, t in timings.items()))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model, "steps": args.steps, "sampler": args.sampler, "seeds_per_prompt": args.seeds,
        "prompts": {split: [c.caption for c in combos] for split, combos in sets.items()},
        "accuracy": table, "seconds_per_image": {f"{g:g}": t for g, t in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        side = pipe.native_size
        columns = len(sets["held_out"])
        grid = Image.new("RGB", (columns * side, len(args.guidance) * side))
        for i, image in enumerate(grid_rows):
            grid.paste(image, ((i % columns) * side, (i // columns) * side))
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(args.grid)
    print(f"wrote {args.json}" + (f" and {args.grid}" if args.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
