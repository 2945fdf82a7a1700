"""The command line: ``python -m stable_diffusion "a prompt" -o out.png``."""

from __future__ import annotations

import numpy as np
from PIL import Image

from stable_diffusion.__main__ import main

SIZE = ["--width", "32", "--height", "32"]


def test_text_to_image_writes_pngs_with_parameters(tiny_sd1_folder, tmp_path, capsys):
    output = tmp_path / "out" / "cat.png"
    code = main(["a cat", "-n", "a dog", "--model", str(tiny_sd1_folder), *SIZE, "--steps", "3",
                 "--sampler", "euler_a", "--seed", "7", "--num-images", "2", "--cfg", "5", "-q", "-o", str(output)])
    assert code == 0
    paths = [tmp_path / "out" / "cat-1.png", tmp_path / "out" / "cat-2.png"]
    assert str(paths[0]) in capsys.readouterr().out
    texts = [Image.open(p).text["parameters"] for p in paths]
    assert texts[0].splitlines()[:2] == ["a cat", "Negative prompt: a dog"]
    assert "Steps: 3, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 32x32" in texts[0]
    assert "Seed: 8," in texts[1]
    assert Image.open(paths[0]).size == (32, 32)


def test_image_to_image_and_reproducible_seed(tiny_sd1_folder, tmp_path):
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(start)
    outputs = []
    for name in ("a.png", "b.png"):
        code = main(["a cat", "--model", str(tiny_sd1_folder), "--init-image", str(start), "--strength", "0.5",
                     "--steps", "4", "--seed", "1", "-q", "-o", str(tmp_path / name)])
        assert code == 0
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*outputs)
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "a.png").text["parameters"]


def test_errors_are_one_line_messages_and_exit_code_2(tiny_sd1_folder, tmp_path, capsys):
    assert main(["a cat", "--model", str(tmp_path / "missing"), "-q"]) == 2
    assert "no file or folder" in capsys.readouterr().err
    assert main(["a cat", "--model", str(tiny_sd1_folder), "--width", "33", "-q"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["   ", "--model", str(tiny_sd1_folder), "-q"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["a cat", "--model", str(tiny_sd1_folder), "--init-image", str(tmp_path / "nope.png"), "-q"]) == 2
    assert "cannot read the init image" in capsys.readouterr().err
