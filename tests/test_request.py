"""The request type: its checks, and the PNG parameters text written and read back."""

from __future__ import annotations

import pytest
import torch

from stable_diffusion.request import (
    GenerationRequest,
    InvalidSetting,
    parse_parameters_text,
    settings_from_parameters,
)

A1111_TEXT = (
    "a (photo:1.2) of a cat,\n"
    "on a mat\n"
    "Negative prompt: blurry, ugly\n"
    'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "fox: 1a2b, cat: 3c4d", Version: v1.10.1'
)


def test_the_web_ui_text_is_parsed_as_the_web_ui_parses_it():
    fields = parse_parameters_text(A1111_TEXT)
    assert fields["Prompt"] == "a (photo:1.2) of a cat,\non a mat"
    assert fields["Negative prompt"] == "blurry, ugly"
    assert fields["Lora hashes"] == "fox: 1a2b, cat: 3c4d"  # a quoted value keeps its commas
    assert settings_from_parameters(fields) == {
        "prompt": "a (photo:1.2) of a cat,\non a mat", "negative_prompt": "blurry, ugly", "steps": 20,
        "guidance_scale": 7.0, "seed": 1234, "width": 512, "height": 768, "sampler": "dpmpp_2m_karras",
    }


@pytest.mark.parametrize("prompt", ["a red circle on a blue background", "", "two\nlines"])
@pytest.mark.parametrize("negative", ["", "a green square"])
def test_our_text_reads_back_as_the_same_settings(prompt, negative):
    request = GenerationRequest(prompt, negative, steps=7, guidance_scale=4.5, sampler="euler_a", seed=3,
                                clip_skip=2, strength=0.6)
    text = request.parameters_text(3, 64, 48, sampler_label="Euler a", model="tiny-shapes")
    settings = settings_from_parameters(parse_parameters_text(text))
    assert settings == {"prompt": prompt, "negative_prompt": negative, "steps": 7, "guidance_scale": 4.5,
                        "sampler": "euler_a", "seed": 3, "clip_skip": 2, "strength": 0.6, "width": 64, "height": 48}
    assert GenerationRequest(**settings) == GenerationRequest(prompt, negative, width=64, height=48, steps=7,
                                                              guidance_scale=4.5, sampler="euler_a", seed=3,
                                                              clip_skip=2, strength=0.6)


def test_text_without_settings_is_all_prompt_and_unknown_samplers_are_left_out():
    assert parse_parameters_text("just words, no settings") == {"Prompt": "just words, no settings", "Negative prompt": ""}
    fields = parse_parameters_text("x\nSteps: 3, Sampler: UniPC, CFG scale: 2, Seed: nine, Size: 8x8")
    assert settings_from_parameters(fields) == {"prompt": "x", "negative_prompt": "", "steps": 3,
                                                "guidance_scale": 2.0, "width": 8, "height": 8}


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        (dict(width=30), "width"), (dict(height=0), "height"), (dict(steps=2.5), "steps"),
        (dict(guidance_scale=31), "guidance_scale"), (dict(guidance_scale="7"), "guidance_scale"),
        (dict(num_images=0), "num_images"), (dict(clip_skip=True), "clip_skip"), (dict(seed=-1), "seed"),
        (dict(strength="high"), "strength"), (dict(decoder="fast"), "decoder"), (dict(negative_prompt=3), "negative_prompt"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
    ],
)
def test_each_bad_setting_is_named(options, setting):
    with pytest.raises(InvalidSetting) as error:
        GenerationRequest("a cat", **options)
    assert error.value.setting == setting
    assert str(error.value).startswith(f"{setting} ")


def test_strength_without_an_image_is_refused(tiny_sd1_folder):
    from stable_diffusion.hub import load

    pipe = load(tiny_sd1_folder, device="cpu", dtype=torch.float32)
    with pytest.raises(InvalidSetting, match="strength applies to image-to-image only"):
        pipe.generate(GenerationRequest("a cat", strength=0.5, steps=2, width=32, height=32))
