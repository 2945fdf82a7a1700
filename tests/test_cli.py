"""The command line: ``python -m stable_diffusion "a prompt" -o out.png``."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion.__main__ import build_parser, main

REPO = Path(__file__).resolve().parent.parent

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
                     *SIZE, "--steps", "4", "--seed", "1", "-q", "-o", str(tmp_path / name)])
        assert code == 0
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*outputs)
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "a.png").text["parameters"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "33"], "--width must be a multiple of 8"),
        (["--cfg", "-1"], "--cfg must be between 0 and 30"),
        (["--steps", "0"], "steps must be"),
        (["--num-images", "0"], "--num-images must be"),
        (["--clip-skip", "9"], "--clip-skip must be from 1"),
        (["--width", "4096", "--height", "4096"], "--width x --height 4096x4096"),
        (["--seed", "-3"], "--seed must be"),
        (["--init-image", "nope.png"], "cannot read the init image"),
        (["--device", "banana"], "Unknown device 'banana'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--dtype", "float8"], "Unknown dtype"),
    ],
)
def test_errors_are_one_line_messages_with_the_flag_names(tiny_sd1_folder, tmp_path, capsys, args, message):
    if args[0] == "--device" and args[1] == "cuda" and torch.cuda.is_available():
        args = ["--device", "cuda:99"]
        message = "no cuda:99"
    code = main(["a cat", "--model", str(tiny_sd1_folder), "--steps", "2", "-q", "-o", str(tmp_path / "x.png"), *args])
    assert code == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_missing_model_and_the_offline_default(tmp_path, capsys, monkeypatch):
    assert main(["a cat", "--model", str(tmp_path / "missing"), "-q"]) == 2
    assert "no file or folder" in one_line_error(capsys)
    # The default model without the Hub (nothing cached): the error points at the bundled model.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["a red circle", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--model models/tiny-shapes" in err or "--model " + str(REPO / "models" / "tiny-shapes") in err


def test_empty_prompt_is_an_unconditional_sample(tiny_sd1_folder, tmp_path):
    output = tmp_path / "empty.png"
    assert main(["", "--model", str(tiny_sd1_folder), *SIZE, "--steps", "2", "--seed", "3", "-q", "-o", str(output)]) == 0
    assert Image.open(output).text["parameters"].startswith("\nSteps: 2")


def test_help_is_plain_text_with_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text
    options = text[text.index("options:"):]
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)[1:]}
    for flag, default in (("--steps", "25"), ("--cfg", "7.5"), ("--sampler", "dpmpp_2m_karras"), ("--strength", "0.75"),
                          ("-o", "out.png"), ("--num-images", "1"), ("--clip-skip", "1"), ("--seed", "random")):
        assert f"(default: {default})" in entries[flag], flag
    for action in build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
