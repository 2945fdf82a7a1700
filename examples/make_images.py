"""Draw the example input images in this folder (run from anywhere: ``python examples/make_images.py``).

Simple shapes and gradients made with PIL and numpy, so the examples carry no third-party
copyright and stay a few kilobytes each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

SIZE = 512
FOLDER = Path(__file__).parent / "images"
# The PNG info tab's example: parameters as the AUTOMATIC1111 web UI writes them (v1.10, with its
# separate schedule type and model hash), to show that its PNGs are read, not only ours.
WEB_UI_PARAMETERS = (
    "a red circle on a blue background\n"
    "Negative prompt: a green background\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def sunset() -> Image.Image:
    """A sky gradient over a dark sea, with a sun: a rough layout for image-to-image."""
    rows = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    sky = (1 - rows) * np.array([255, 140, 60]) + rows * np.array([90, 40, 120])
    array = np.broadcast_to(sky, (SIZE, SIZE, 3))
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((196, 230, 316, 350), fill=(255, 220, 120))
    # The sea is drawn after the sun, so the sun sets behind the horizon.
    draw.rectangle((0, SIZE * 2 // 3, SIZE, SIZE), fill=(20, 30, 70))
    return image


def shapes() -> Image.Image:
    """A red circle, a blue square and a yellow triangle on a light background."""
    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 220, 240), fill=(210, 40, 40))
    draw.rectangle((280, 80, 460, 260), fill=(40, 80, 200))
    draw.polygon([(256, 290), (140, 470), (372, 470)], fill=(240, 200, 30))
    return image


def square() -> Image.Image:
    """One blue square on white: the kind of scene the bundled tiny-shapes model knows."""
    image = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    ImageDraw.Draw(image).rectangle((150, 170, 350, 370), fill=(30, 70, 220))
    return image


def house() -> Image.Image:
    """A child's drawing of a house on a hill under a blue sky."""
    image = Image.new("RGB", (SIZE, SIZE), (120, 180, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((-200, 330, 712, 800), fill=(70, 160, 60))
    draw.rectangle((170, 250, 350, 400), fill=(230, 210, 170))
    draw.polygon([(150, 250), (260, 150), (370, 250)], fill=(170, 50, 40))
    draw.rectangle((240, 320, 285, 400), fill=(100, 60, 30))
    draw.rectangle((190, 275, 230, 310), fill=(200, 230, 255))
    draw.rectangle((295, 275, 335, 310), fill=(200, 230, 255))
    draw.ellipse((400, 40, 480, 120), fill=(255, 230, 90))
    return image


def circle() -> Image.Image:
    """A red circle on blue, the picture WEB_UI_PARAMETERS describes."""
    image = Image.new("RGB", (SIZE, SIZE), (40, 70, 200))
    ImageDraw.Draw(image).ellipse((136, 136, 376, 376), fill=(215, 35, 35))
    return image


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, draw in (("sunset", sunset), ("shapes", shapes), ("house", house), ("square", square)):
        draw().save(FOLDER / f"{name}.png", optimize=True)
    info = PngInfo()
    info.add_text("parameters", WEB_UI_PARAMETERS)
    circle().save(FOLDER / "web-ui-parameters.png", optimize=True, pnginfo=info)


if __name__ == "__main__":
    main()
