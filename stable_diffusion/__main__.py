"""Command line: generate images from a prompt, or redraw an image, and save them as PNG files.

Each PNG carries its generation parameters in a "parameters" text chunk, in the format the
popular web UIs write, so other tools (and the app's PNG info tab) can read them back.

examples:
  python -m stable_diffusion "a watercolor lighthouse at dawn" -n "blurry" --steps 25 --seed 42 -o lighthouse.png
  python -m stable_diffusion "the same scene at night" --init-image lighthouse.png --strength 0.6 -o night.png
  python -m stable_diffusion "a red circle on a blue background" --model models/tiny-shapes -o circle.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .devices import parse_device, parse_dtype
from .hub import DEFAULT_MODEL, ModelLoadError, load
from .images import save_png
from .pipelines import Generation, GenerationCancelled, StableDiffusion
from .request import GenerationRequest, InvalidSetting
from .samplers import SAMPLER_NAMES

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-shapes"

# The request's settings under the flag names a user types, for error messages.
FLAGS = {
    "prompt": "the prompt",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "size": "--width x --height",
    "steps": "--steps",
    "guidance_scale": "--cfg",
    "sampler": "--sampler",
    "seed": "--seed",
    "num_images": "--num-images",
    "clip_skip": "--clip-skip",
    "strength": "--strength",
    "decoder": "--decoder",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help (unless the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, "", False, argparse.SUPPRESS):
            return help_text
        return f"{help_text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    defaults = GenerationRequest("")
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("prompt", help="what the image should show (empty: an unconditional sample)")
    parser.add_argument("-o", "--output", default="out.png",
                        help="output PNG; with several images, -1, -2, ... is added before .png")
    parser.add_argument("-n", "--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--init-image", type=Path, metavar="PNG", help="start from this image (image-to-image)")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="image-to-image: how much of the image to redraw, in (0, 1]")
    parser.add_argument("--width", type=int,
                        help="multiple of 8 (default: the model's native size; image-to-image: the input's "
                             "aspect ratio at the native area)")
    parser.add_argument("--height", type=int, help="multiple of 8 (default: as for --width)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="sampling steps")
    parser.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", metavar="SCALE", type=float, default=defaults.guidance_scale,
                        help="classifier-free guidance scale (1 or less: no guidance)")
    parser.add_argument("--sampler", default=defaults.sampler, choices=SAMPLER_NAMES, help="the sampler")
    parser.add_argument("--seed", type=int, help="image i uses seed + i (default: random)")
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="images to generate")
    parser.add_argument("--clip-skip", type=int, default=defaults.clip_skip,
                        help="1 = last CLIP layer, 2 = penultimate")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub repo id, local diffusers folder or single .safetensors file")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: the best present)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the fastest that keeps the image)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        request = GenerationRequest(
            args.prompt, args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
            guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed, num_images=args.num_images,
            clip_skip=args.clip_skip, strength=args.strength if args.init_image is not None else None,
        )
        image = _read_image(args.init_image) if args.init_image is not None else None
        pipe = _load(args)
        result = _generate(pipe, request, image, quiet=args.quiet)
    except InvalidSetting as error:
        return _fail(f"{FLAGS.get(error.setting, error.setting)} {error.problem}")
    except (ModelLoadError, ValueError, GenerationCancelled) as error:
        return _fail(str(error))
    _save(result, Path(args.output))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read the init image {path}: {error}") from None


def _load(args: argparse.Namespace) -> StableDiffusion:
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    try:
        return load(args.model, device=device, dtype=dtype)
    except ModelLoadError as error:
        if args.model == DEFAULT_MODEL and BUNDLED_MODEL.is_dir():
            raise ModelLoadError(
                f"{error}\nWithout the Hub, try the bundled tiny model: --model {_shown(BUNDLED_MODEL)} "
                "(it draws one coloured shape on a coloured background, e.g. \"a red circle on a blue background\")."
            ) from None
        raise


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _generate(pipe: StableDiffusion, request: GenerationRequest, image: Image.Image | None, *, quiet: bool) -> Generation:
    with tqdm(desc="sampling", unit="step", disable=quiet) as bar:

        def progress(step: int, total: int, _x0) -> None:
            bar.total = total
            bar.update(1)

        return pipe.generate(request, image=image, callback=progress)


def _save(result: Generation, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    for i, (image, parameters) in enumerate(zip(result.images, result.parameters, strict=True)):
        path = output if len(result.images) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}")
        save_png(image, path, parameters)
        print(f"{path}  (seed {result.seeds[i]})")


if __name__ == "__main__":
    sys.exit(main())
