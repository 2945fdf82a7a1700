"""Command line: ``python -m stable_diffusion "a prompt" -o out.png``.

Each PNG carries its generation parameters in a ``parameters`` text chunk, in the format the
popular web UIs write, so other tools can read them back.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .devices import parse_dtype
from .hub import DEFAULT_MODEL, ModelLoadError, load
from .images import save_png
from .pipelines import GenerationCancelled
from .samplers import SAMPLER_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG; with several images, -1, -2, ... is added before .png (default: out.png)")
    parser.add_argument("-n", "--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--init-image", type=Path, help="start from this image (image-to-image)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="image-to-image: how much of the image to redraw, in (0, 1] (default 0.75)")
    parser.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size)")
    parser.add_argument("--height", type=int, help="multiple of 8 (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", "--cfg", type=float, default=7.5)
    parser.add_argument("--sampler", default="dpmpp_2m_karras", choices=SAMPLER_NAMES)
    parser.add_argument("--seed", type=int, help="image i uses seed + i (default: random)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer, 2 = penultimate")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hub repo id, local diffusers folder or single .safetensors file (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the fastest that keeps the image)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        pipe = load(args.model, device=args.device, dtype=parse_dtype(args.dtype))
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    bar = None if args.quiet else tqdm(desc="sampling", unit="step")

    def progress(step: int, total: int, _x0) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    options = dict(
        negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
        guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed, num_images=args.num_images,
        clip_skip=args.clip_skip, callback=progress,
    )
    try:
        if args.init_image is not None:
            from PIL import Image

            try:
                image = Image.open(args.init_image)
                image.load()
            except OSError as error:
                print(f"error: cannot read the init image {args.init_image}: {error}", file=sys.stderr)
                return 2
            result = pipe.image_to_image(image, args.prompt, strength=args.strength, **options)
        else:
            result = pipe.text_to_image(args.prompt, **options)
    except (ValueError, GenerationCancelled) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for i, (image, parameters) in enumerate(zip(result.images, result.parameters)):
        path = output if len(result.images) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}")
        save_png(image, path, parameters)
        print(f"{path}  (seed {result.seeds[i]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
