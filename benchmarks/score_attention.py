"""Do the tiny shapes model's cross-attention word maps sit on the words' pixels?

For shapes captions ("a red circle on a blue background") the tiny model draws one shape; the
analyzer (``tiny_shapes.scoring.shape_mask``) finds its pixels. A word's score is the mean of its
map inside the shape divided by the mean outside: above 1, the word sits on the shape. The object's
colour word and the shape word should score above 1, the background's colour word below 1.

Each image is generated once, with several attention captures listening together, so every
aggregation sees the same runs: the plain sum of attention probabilities (DAAM's), the
value-weighted sum (what ``text_to_image(attention_maps=True)`` returns), each over every layer or
only the finest-resolution ones, over every step or only the second half.

    python benchmarks/score_attention.py             # the README's table (about 3 minutes)
    python benchmarks/score_attention.py --prompts 6 --seeds 2 --steps 12   # the test's settings
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stable_diffusion import inside, prompts  # noqa: E402
from stable_diffusion.hub import load  # noqa: E402
from stable_diffusion.layers import attention_probe  # noqa: E402
from tiny_shapes.dataset import Combination, all_combinations  # noqa: E402
from tiny_shapes.scoring import shape_mask  # noqa: E402

MODEL = ROOT / "models" / "tiny-shapes"
WORDS = ("color", "shape", "background")
COLUMNS = (*WORDS, "shape outline", "end of text")
DEFAULT = "value, all layers"  # what text_to_image(attention_maps=True) returns
EOS = "<end of text>"  # the first EOS token, scored too: it carries the whole caption (the text encoder is causal)
# Half-width of the band around the shape's edge where the shape word is also scored (32-px images).
OUTLINE_PIXELS = 2
# An image whose shape covers fewer pixels than this (or leaves fewer outside) has no inside/outside to compare.
MIN_PIXELS = 10


def localisation(word_map: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the map on the mask's pixels over its mean elsewhere."""
    return float(word_map[mask].mean() / max(word_map[~mask].mean(), 1e-12))


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by ``pixels`` in the four axis directions (repeated one-pixel dilations)."""
    for _ in range(pixels):
        mask = mask.copy() | np.pad(mask, 1)[2:, 1:-1] | np.pad(mask, 1)[:-2, 1:-1] | np.pad(mask, 1)[1:-1, 2:] | np.pad(mask, 1)[1:-1, :-2]
    return mask


def outline(mask: np.ndarray, *, pixels: int = OUTLINE_PIXELS) -> np.ndarray:
    """The band of pixels within ``pixels`` of the shape's edge, on either side."""
    return grown(mask, pixels) & grown(~mask, pixels)


def word_positions(texts: list[str], combination: Combination) -> dict[str, int]:
    """Which of the maps is the object's colour, the shape, the background's colour and the end of text."""
    positions = {word: texts.index(getattr(combination, word)) for word in WORDS}
    return positions | ({"end of text": texts.index(EOS)} if EOS in texts else {})


def score_images(images, maps: list[list[inside.WordMap]], combination: Combination) -> list[dict[str, float]]:
    """Each word's score on each image that has a shape to compare against."""
    scores = []
    for image, image_maps in zip(images, maps, strict=True):
        mask = shape_mask(image)
        if mask.sum() < MIN_PIXELS or (~mask).sum() < MIN_PIXELS:
            continue
        positions = word_positions([text for text, _ in image_maps], combination)
        image_scores = {word: localisation(image_maps[i][1], mask) for word, i in positions.items()}
        image_scores["shape outline"] = localisation(image_maps[positions["shape"]][1], outline(mask))
        scores.append(image_scores | {"shape name": combination.shape})
    return scores


def captured_runs(pipe, combination: Combination, *, seed: int, num_images: int, steps: int, guidance: float):
    """One generation with three captures listening: plain, value-weighted, value-weighted in the second half of steps."""
    captures = {
        "probability": inside.AttentionCapture(num_images, weighting="probability"),
        "value": inside.AttentionCapture(num_images, weighting="value"),
        "value, second half of steps": inside.AttentionCapture(num_images, weighting="value"),
    }
    late = captures["value, second half of steps"]
    late.enabled = False

    def probe(*arguments) -> None:
        for capture in captures.values():
            capture(*arguments)

    def on_step(step: int, total: int, x0_hat: torch.Tensor) -> None:
        late.enabled = step + 1 >= total // 2  # from the next step on

    with attention_probe(probe):
        result = pipe.text_to_image(combination.caption, steps=steps, guidance_scale=guidance, seed=seed,
                                    num_images=num_images, callback=on_step)
    return result.images, captures


def aggregations(captures: dict[str, inside.AttentionCapture], tokens, size: tuple[int, int], latent: tuple[int, int]):
    """Every row of the table: each capture over every layer, and over the finest layers only."""
    rows = {}
    for name, capture in captures.items():
        for finest in (False, True):
            label = f"{name}, {'finest layers' if finest else 'all layers'}"
            rows[label] = inside.word_maps(capture.maps(*latent, finest_only=finest), tokens, size)
    return rows


def score(pipe, combinations: list[Combination], *, seeds: int, steps: int, guidance: float) -> dict[str, dict]:
    """Per aggregation and word: the mean score and the share of images scoring above 1."""
    per_row: dict[str, list[dict[str, float]]] = {}
    length = pipe.text_encoder.config.max_position_embeddings
    size = (pipe.native_size, pipe.native_size)
    latent = (pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    for combination in combinations:
        tokens = inside.prompt_tokens(pipe.tokenizer, prompts.token_windows(pipe.tokenizer, combination.caption, length=length))
        tokens.append(inside.PromptToken(tokens[-1].position + 1, EOS))
        images, captures = captured_runs(pipe, combination, seed=0, num_images=seeds, steps=steps, guidance=guidance)
        for label, maps in aggregations(captures, tokens, size, latent).items():
            per_row.setdefault(label, []).extend(score_images(images, maps, combination))
    table = {label: summary(scores) for label, scores in per_row.items()}
    default = per_row[DEFAULT]
    for shape in sorted({s["shape name"] for s in default}):
        table[f"{DEFAULT}: {shape}s only"] = summary([s for s in default if s["shape name"] == shape])
    return table


def summary(scores: list[dict[str, float]]) -> dict[str, dict[str, float] | int]:
    """Each column's mean score and share of images above 1."""
    return {
        column: {"mean": float(np.mean([s[column] for s in scores])), "above_1": float(np.mean([s[column] > 1 for s in scores]))}
        for column in COLUMNS
    } | {"images": len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="shapes captions, a fixed random sample of all 168")
    parser.add_argument("--seeds", type=int, default=4, help="images per caption (seeds 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "score_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny networks: threads cost more than they save
    pipe = load(MODEL, device="cpu", dtype=torch.float32)
    combinations = random.Random(0).sample(all_combinations(), args.prompts)
    start = time.perf_counter()
    table = score(pipe, combinations, seeds=args.seeds, steps=args.steps, guidance=args.guidance)
    print(f"{args.prompts} captions x {args.seeds} seeds, {args.steps} steps of dpmpp_2m_karras, guidance {args.guidance:g} "
          f"({time.perf_counter() - start:.0f} s). Score: mean inside the shape / mean outside (share of images above 1); "
          f"outline: mean within {OUTLINE_PIXELS} px of the shape's edge / mean elsewhere.\n")
    print("| aggregation | object's colour word | shape word | background's colour word | shape word on the outline "
          "| end of text |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in table.items():
        cells = " | ".join(f"{row[word]['mean']:.2f} ({row[word]['above_1']:.0%})" for word in COLUMNS)
        print(f"| {label} | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "table": table}, indent=2))


if __name__ == "__main__":
    main()
