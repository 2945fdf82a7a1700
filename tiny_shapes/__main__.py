"""Build the bundled tiny model and train it on the shapes dataset with the package's training loop.

``init`` saves a fresh model (a BPE vocabulary learned from the captions, random weights); ``vae``
and ``diffusion`` are the two stages of ``stable_diffusion.train`` with the same options, on the
shapes stream instead of a folder. ``models/tiny-shapes`` was made with (64 minutes on 2 CPU
cores shared with other work)::

    python -m tiny_shapes init --output runs/tiny-shapes/init
    python -m tiny_shapes vae --model runs/tiny-shapes/init --output runs/tiny-shapes/vae
    python -m tiny_shapes diffusion --model runs/tiny-shapes/vae --output runs/tiny-shapes/base \\
        --train-text-encoder --save-dtype float16 --checkpoint-dir runs/tiny-shapes/checkpoints
    python -m tiny_shapes diffusion --model runs/tiny-shapes/base --output models/tiny-shapes \\
        --train-text-encoder --save-dtype float16 --checkpoint-dir runs/tiny-shapes/checkpoints-cfg \\
        --caption-dropout 0.2 --learning-rate 2e-4 --lr-schedule constant --steps 1000 --seed 1

(after an interruption, the same command with ``--resume latest``). The last stage, a weight
average over 1,000 steps at a constant rate with the caption dropped twice as often, is what
makes the web UIs' default (Euler a, guidance 7) draw the right colours (README, *Training*).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from stable_diffusion import hub
from stable_diffusion.train import add_stage_commands, command_line, config_options, run_stage

from .dataset import ShapesDataset
from .recipe import tiny_shapes_pipeline, train_config

logger = logging.getLogger("tiny_shapes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tiny_shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="build a fresh tiny model for the shapes dataset")
    init.add_argument("--output", required=True, type=Path)
    init.add_argument("--resolution", type=int, default=32, help="image side in pixels, a multiple of 4 (default 32)")
    init.add_argument("--seed", type=int, default=0)
    add_stage_commands(commands)
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "init":
        hub.save(tiny_shapes_pipeline(resolution=args.resolution, seed=args.seed), args.output)
        logger.info("saved a fresh tiny model to %s", args.output)
        return
    config = train_config(**config_options(args))
    run_stage(args, config, functools.partial(ShapesDataset, split="train", seed=config.seed))


def main(argv: list[str] | None = None) -> int:
    return command_line(build_parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(main())
