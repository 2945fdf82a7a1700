"""Inpainting and outpainting (stable_diffusion/inpainting.py, the pipeline's inpainting mode, the app's tab).

Parity: the same tiny random weights, seed and scheduler settings go through ``pipe.inpaint`` and
diffusers' ``StableDiffusionInpaintPipeline``, for a 9-channel inpainting UNet and for a regular
one, with a deterministic (DDIM), an ancestral (Euler a) and a multistep (DPM++ 2M Karras) sampler,
at strength 1 and 0.8. The images must agree within 2/255 inside the mask, and the final latents
to float32 rounding, which is what tells a different first step apart (see
``test_the_network_sees_the_start_as_it_is``). Full-size checks at SD 1.5's shapes are ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

from conftest import HUB_LAYOUTS, assert_same_picture
from ldm_export import hub_to_ldm
from test_pipelines import ours, reference  # noqa: F401 (fixtures: the tiny SD 1.x reference and our load of it)
from stable_diffusion import denoisers
from stable_diffusion.hub import load
from stable_diffusion.images import save_png
from stable_diffusion.inpainting import blurred, model_masks, outpaint_canvas, paste_back, read_mask
from stable_diffusion.request import parse_parameters_text, settings_from_parameters

SIZE = 32  # pixels; the tiny VAE downsamples 2x, so 16x16 latents
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
SD15_SCHEDULER = "scheduler/scheduler_config.json"


# ------------------------------------------------------------------------------------ helpers
def random_picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """White (repaint) inside ``box`` = (left, top, right, bottom), black elsewhere."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def inpainting_unet(unet, seed: int):
    """A random diffusers UNet shaped like ``unet`` but with 9 input channels (SD 1.5 inpainting's shape)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Without "_use_default_values", which would send in_channels back to its default.
    config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    return UNet2DConditionModel.from_config({**config, "in_channels": 9}).eval()


def with_inpainting_unet(reference, seed: int = 1):
    """The reference pipeline's networks with a 9-channel UNet in place of its UNet."""
    return {**reference.components, "unet": inpainting_unet(reference.unet, seed)}


def saved(components: dict, folder: Path) -> Path:
    """The networks saved by diffusers in the Hub layout, with SD 1.5's own scheduler file (as the Hub has it)."""
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline(**components).save_pretrained(folder)
    (folder / SD15_SCHEDULER).write_text((HUB_LAYOUTS / "stable-diffusion-v1-5" / SD15_SCHEDULER).read_text())
    return folder


def reference_inpaint(components: dict, sampler: str, **kwargs) -> tuple[np.ndarray, torch.Tensor]:
    """diffusers' picture (8-bit) and final latents, with the sampler's scheduler built as its users build it."""
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline(**components)
    class_name, options = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(output_type="latent", **kwargs).images
    # What the pipeline does with them for output_type="np" (no safety checker).
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    return (image * 255).round().astype(np.int16), latents


def our_inpaint(pipe, monkeypatch, *args, **options) -> tuple[np.ndarray, torch.Tensor]:
    """Our picture and the latents it was decoded from."""
    decoded = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda latents, **kw: decoded.append(latents) or decode(latents, **kw))
    result = pipe.inpaint(*args, **options)
    monkeypatch.undo()
    return pixels(result.images[0]), decoded[0]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def inpainting_components(reference):
    return with_inpainting_unet(reference)


@pytest.fixture(scope="module")
def inpainting_folder(inpainting_components, tmp_path_factory) -> Path:
    return saved(inpainting_components, tmp_path_factory.mktemp("tiny-sd1-inpainting"))


@pytest.fixture(scope="module")
def inpainting_model(inpainting_folder):
    return load(inpainting_folder, device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("strength", [1.0, 0.8])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("unet", ["inpainting", "regular"])
def test_inpainting_matches_diffusers(request, monkeypatch, reference, unet, sampler, strength):
    if unet == "inpainting":
        components, ours = request.getfixturevalue("inpainting_components"), request.getfixturevalue("inpainting_model")
        assert ours.unet.config.in_channels == 9  # loaded from the diffusers layout
    else:
        components, ours = reference.components, request.getfixturevalue("ours")
    image, mask = random_picture((SIZE, SIZE)), box_mask((SIZE, SIZE), (4, 8, 20, 26))
    kwargs = dict(prompt="a red cat", negative_prompt="blurry", image=image, mask_image=mask, strength=strength,
                  num_inference_steps=8, guidance_scale=5.0, height=SIZE, width=SIZE)
    expected, expected_latents = reference_inpaint(components, sampler, generator=torch.Generator().manual_seed(3),
                                                   **kwargs)
    got, latents = our_inpaint(ours, monkeypatch, image, mask, "a red cat", "blurry", strength=strength, steps=8,
                               guidance_scale=5.0, sampler=sampler, seed=3, width=SIZE, height=SIZE)
    inside = np.asarray(mask) > 0
    assert np.abs(got - expected)[inside].max() <= 2
    assert np.abs(got - expected).max() <= 2
    # The latents to float32 rounding (relative 1e-5 of their size: these random networks' latents reach ~70).
    scale = float(expected_latents.abs().max())
    assert float((latents - expected_latents).abs().max()) < 1e-5 * scale


def test_each_image_of_a_batch_is_its_own_seed(ours):
    image, mask = random_picture((SIZE, SIZE)), box_mask((SIZE, SIZE), (0, 0, 16, 32))
    options = dict(steps=4, sampler="euler_a", width=SIZE, height=SIZE)
    batch = ours.inpaint(image, mask, "a cat", seed=20, num_images=2, **options)
    alone = ours.inpaint(image, mask, "a cat", seed=21, **options)
    assert batch.seeds == [20, 21]
    assert_same_picture(pixels(alone.images[0]), pixels(batch.images[1]))
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_a_full_mask_with_a_regular_unet_is_image_to_image(ours):
    """Documented behaviour: everything is repainted, from the image noised to the strength."""
    image = random_picture((SIZE, SIZE), seed=4)
    options = dict(strength=0.6, steps=10, sampler="ddim", seed=5, width=SIZE, height=SIZE)
    inpainted = ours.inpaint(image, Image.new("L", image.size, 255), "a square", **options)
    redrawn = ours.image_to_image(image, "a square", **options)
    np.testing.assert_array_equal(pixels(inpainted.images[0]), pixels(redrawn.images[0]))


def test_the_network_sees_the_start_as_it_is():
    """The regular UNet's wrapper: the sampler's x̃ at the first σ; after it, the original noised to σ outside."""
    seen = []

    def denoiser(x, sigma, **options):
        seen.append((x.clone(), sigma, options))
        return torch.full_like(x, 7.0)

    mask = torch.tensor([[[[1.0, 0.0]]]])
    known = denoisers.KnownRegion(original=torch.full((1, 1, 1, 2), 2.0), noise=torch.full((1, 1, 1, 2), 0.5), mask=mask)
    wrapped = denoisers.InpaintingDenoiser(denoiser, known, start_sigma=10.0)
    x = torch.tensor([[[[3.0, 4.0]]]])
    assert wrapped(x, 10.0, round_timestep=True).tolist() == [[[[7.0, 2.0]]]]  # x̂0 outside: the original
    assert wrapped(x, 4.0).tolist() == [[[[7.0, 2.0]]]]
    (first, _, options), (later, sigma, _) = seen
    assert first.tolist() == x.tolist() and options == {"round_timestep": True}
    assert later.tolist() == [[[[3.0, 2.0 + 4.0 * 0.5]]]] and sigma == 4.0


# ------------------------------------------------------------------------------------ loading 9-channel models
def test_inpainting_model_loads_from_a_single_file(tmp_path):
    """An SD 1.5 inpainting single file: ``input_blocks.0.0.weight`` takes 9 channels."""
    from test_single_file import build_tiny_ldm_reference, hub_state

    networks = build_tiny_ldm_reference("sd1")
    networks["unet"] = inpainting_unet(networks["unet"], seed=2)
    ldm = hub_to_ldm({name: hub_state(name, model) for name, model in networks.items()}, kind="sd1")
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    path = tmp_path / "tiny-inpainting.safetensors"
    save_file({name: t.contiguous() for name, t in ldm.items()}, path)
    pipe = load(path, device="cpu", dtype=torch.float32)
    assert pipe.unet.config.in_channels == 9 and pipe.scheduler.prediction_type == "epsilon"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 8, 8, generator=generator)
    context = torch.randn(1, 16, networks["unet"].config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = networks["unet"](x, 500, encoder_hidden_states=context).sample
        assert float((pipe.unet(x, 500, context) - expected).abs().max()) < 1e-4


def test_sd2_inpainting_single_file_predicts_epsilon(hub_layouts):
    """SD 2 inpainting's file has SD 2's OpenCLIP and a 9-channel UNet: ε at 512 px, unlike SD 2.1's v at 768."""
    from test_single_file import configs_of, meta_state, real_ldm_keys

    shapes = real_ldm_keys(hub_layouts, "sd2")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = [320, 9, 3, 3]
    configs = configs_of(meta_state(shapes))
    assert configs["unet"]["in_channels"] == 9
    assert configs["scheduler"]["prediction_type"] == "epsilon" and configs["unet"]["sample_size"] == 64
    # A sidecar or the argument still wins.
    assert configs_of(meta_state(shapes), prediction_type="v_prediction")["scheduler"]["prediction_type"] == "v_prediction"


def test_an_inpainting_model_asks_for_a_mask(inpainting_model):
    with pytest.raises(ValueError, match="inpainting model: use inpaint"):
        inpainting_model.text_to_image("a cat", width=SIZE, height=SIZE, steps=2)
    with pytest.raises(ValueError, match="inpainting model: use inpaint"):
        inpainting_model.image_to_image(random_picture((SIZE, SIZE)), "a cat", steps=2)


# ------------------------------------------------------------------------------------ masks
def test_masks_of_any_mode_and_size():
    size = (40, 24)
    gray = box_mask(size, (8, 4, 24, 20))
    alpha = Image.new("RGBA", size, (0, 0, 0, 0))
    alpha.paste((200, 10, 10, 255), (8, 4, 24, 20))  # a red brush stroke on a transparent layer: the alpha counts
    for mask in (gray, gray.convert("RGB"), gray.convert("1"), gray.convert("P"), alpha, gray.convert("RGBA"),
                 np.asarray(gray), np.asarray(gray.convert("RGB"))):
        np.testing.assert_array_equal(np.asarray(read_mask(mask, size=size)), np.asarray(gray))
    small = read_mask(box_mask((20, 12), (4, 2, 12, 10)), size=size)
    assert small.size == size and small.getpixel((16, 12)) == 255 and small.getpixel((2, 2)) == 0


def test_model_masks_binarize_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    soft = blurred(box_mask((SIZE, SIZE), (5, 9, 21, 27)), 3)
    pixel_mask, latent_mask = model_masks(soft, 24, 40, downsampling_factor=8)
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = processor.preprocess(soft, height=40, width=24)
    assert torch.equal(pixel_mask, expected)
    assert torch.equal(latent_mask, F.interpolate(expected, size=(5, 3)))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (None, "No mask"),
        ("mask.png", "PIL image or an array"),
        (np.zeros((4, 4, 3), dtype=np.float64), "cannot be read"),
        (Image.new("L", (SIZE, SIZE), 0), "nothing to repaint"),
        (box_mask((SIZE, SIZE), (3, 3, 4, 4)), "nothing to repaint"),  # smaller than a latent pixel, between samples
    ],
)
def test_bad_masks_are_clear_errors(ours, mask, message):
    with pytest.raises(ValueError, match=message):
        ours.inpaint(random_picture((SIZE, SIZE)), mask, "a cat", steps=2, width=SIZE, height=SIZE)


def test_unreadable_pictures_are_clear_errors(ours, tmp_path):
    mask = box_mask((SIZE, SIZE), (0, 0, 16, 16))
    path = tmp_path / "truncated.png"
    random_picture((SIZE, SIZE)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be read"):
        ours.inpaint(Image.open(path), mask, "a cat", steps=2)
    with pytest.raises(ValueError, match="No input image"):
        ours.inpaint(None, mask, "a cat", steps=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(mask_blur=-1), "mask_blur must be a whole number of pixels from 0 to 64"),
        (dict(mask_blur=2.5), "mask_blur"),
        (dict(paste_back="yes"), "paste_back must be True or False"),
        (dict(strength=0.0), "strength"),
    ],
)
def test_bad_inpainting_settings(ours, options, message):
    with pytest.raises(ValueError, match=message):
        ours.inpaint(random_picture((SIZE, SIZE)), box_mask((SIZE, SIZE), (0, 0, 16, 16)), "a cat", steps=2,
                        **options)


def test_mask_settings_need_a_mask(ours):
    with pytest.raises(ValueError, match="mask_blur applies to inpainting only"):
        ours.text_to_image("a cat", width=SIZE, height=SIZE, steps=2, mask_blur=4)
    with pytest.raises(ValueError, match="paste_back applies to inpainting only"):
        ours.image_to_image(random_picture((SIZE, SIZE)), "a cat", steps=2, paste_back=True)


# ------------------------------------------------------------------------------------ paste back, PNG
def test_paste_back_keeps_every_pixel_outside_the_blurred_mask(ours):
    image = random_picture((48, 40), seed=7)  # generated at 16x16 (the native area): pasted back at 48x40
    mask = box_mask(image.size, (10, 8, 30, 28))
    result = ours.inpaint(image, mask, "a cat", steps=3, seed=1, mask_blur=3, paste_back=True)
    out, original = pixels(result.images[0]), pixels(image)
    assert out.shape == original.shape
    soft = np.asarray(blurred(mask, 3))
    assert (soft > 0).sum() > (np.asarray(mask) > 0).sum()  # the blur widened the mask
    np.testing.assert_array_equal(out[soft == 0], original[soft == 0])
    assert np.abs(out - original)[np.asarray(mask) > 0].mean() > 10  # and inside it, something new


def test_paste_back_composites_by_the_mask():
    original, generated = Image.new("RGB", (4, 1), (0, 0, 0)), Image.new("RGB", (2, 1), (200, 100, 50))
    mask = Image.fromarray(np.array([[0, 255, 128, 0]], dtype=np.uint8))
    (out,) = paste_back([generated], original, mask)
    assert pixels(out)[0].tolist() == [[0, 0, 0], [200, 100, 50], [100, 50, 25], [0, 0, 0]]
    with pytest.raises(ValueError, match="one size"):
        paste_back([generated], original, Image.new("L", (3, 1)))


def test_png_parameters_say_strength_and_mask_blur(ours, tmp_path):
    result = ours.inpaint(random_picture((SIZE, SIZE)), box_mask((SIZE, SIZE), (0, 0, 16, 32)), "a cat",
                             steps=3, seed=2, mask_blur=4, strength=0.75, sampler="ddim", width=SIZE, height=SIZE)
    path = tmp_path / "inpainted.png"
    save_png(result.images[0], path, result.parameters[0])
    fields = parse_parameters_text(Image.open(path).text["parameters"])
    assert fields["Denoising strength"] == "0.75" and fields["Mask blur"] == "4"
    settings = settings_from_parameters(fields)
    assert settings["strength"] == 0.75 and settings["mask_blur"] == 4 and settings["sampler"] == "ddim"
    default = ours.inpaint(random_picture((SIZE, SIZE)), box_mask((SIZE, SIZE), (0, 0, 16, 32)), "a cat", steps=2)
    assert "Denoising strength: 1, Mask blur: 0" in default.parameters[0]


# ------------------------------------------------------------------------------------ outpainting
def test_outpaint_canvas_extends_and_masks_the_new_area():
    image = random_picture((48, 32), seed=3)
    canvas, mask = outpaint_canvas(image, left=8, right=16, bottom=24)
    assert canvas.size == (72, 56) and mask.size == (72, 56)
    np.testing.assert_array_equal(pixels(canvas)[0:32, 8:56], pixels(image))
    area = np.asarray(mask) == 255
    assert not area[0:32, 8:56].any() and area.sum() == 72 * 56 - 48 * 32 and set(np.unique(mask)) == {0, 255}
    # The fill continues the edges, with noise: red on the left, blue on the right of a red | blue picture.
    halves = Image.new("RGB", (48, 32), (255, 0, 0))
    halves.paste((0, 0, 255), (24, 0, 48, 32))
    canvas, _ = outpaint_canvas(halves, left=16, right=16)
    for columns, colour in ((slice(0, 16), (255, 0, 0)), (slice(64, 80), (0, 0, 255))):
        fill = pixels(canvas)[:, columns].reshape(-1, 3)
        assert np.abs(fill.mean(axis=0) - colour).max() < 12 and fill.std(axis=0).min() > 5
    # The picture's own mask joins the new area.
    _, joined = outpaint_canvas(image, top=8, mask=box_mask(image.size, (0, 0, 8, 8)))
    assert np.asarray(joined)[8:16, 0:8].all() and np.asarray(joined)[0:8].all() and not np.asarray(joined)[20:, 20:].any()


@pytest.mark.parametrize(
    ("sides", "message"),
    [(dict(right=12), "right must be .* a multiple of 8"), (dict(left=-8), "left"), ({}, "at least one side")],
)
def test_bad_outpaint_sides(sides, message):
    with pytest.raises(ValueError, match=message):
        outpaint_canvas(random_picture((16, 16)), **sides)


def test_outpainting_by_128_on_the_right_keeps_the_picture(ours):
    picture = random_picture((512, 512), seed=9)
    canvas, mask = outpaint_canvas(picture, right=128)
    result = ours.inpaint(canvas, mask, "a cat", steps=2, seed=0, paste_back=True)
    out = pixels(result.images[0])
    assert out.shape == (512, 640, 3)
    np.testing.assert_array_equal(out[:, :512], pixels(picture))


# ------------------------------------------------------------------------------------ the app
@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from test_app import make_tiny_model, serve_app

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    with serve_app("--model", str(folder), "--device", "cpu", "--dtype", "float32", log=log) as url:
        yield url


def call_inpaint(client: Client, picture: Path, layers: list[Path], *, mask_blur=4, outpaint=(0, 0, 0, 0), seed=1,
                 width=0, height=0, prompt="a red circle"):
    editor = {"background": handle_file(str(picture)), "layers": [handle_file(str(p)) for p in layers],
              "composite": None}
    return client.predict(editor, 1.0, mask_blur, *outpaint, prompt, "", "euler", 3, 7.5, width, height, seed, 1,
                          api_name="/inpaint")


def test_app_keeps_every_pixel_outside_the_blurred_mask(app_url, tmp_path):
    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    picture, original = tmp_path / "picture.png", random_picture((72, 56), seed=11)
    original.save(picture)
    # A brush layer: strokes on transparency (any colour), as the editor exports it.
    layer = Image.new("RGBA", original.size, (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (20, 16, 44, 40))
    layer.save(tmp_path / "layer.png")
    gallery, _preview, parameters = call_inpaint(client, picture, [tmp_path / "layer.png"], mask_blur=4)
    out = Image.open(gallery[0]["image"])
    assert out.size == original.size
    soft = np.asarray(blurred(read_mask(layer, size=original.size), 4))
    np.testing.assert_array_equal(pixels(out)[soft == 0], pixels(original)[soft == 0])
    assert np.abs(pixels(out) - pixels(original))[soft == 255].mean() > 10
    assert "Denoising strength: 1, Mask blur: 4" in out.info["parameters"] and "Mask blur: 4" in parameters


def test_app_outpaints(app_url, tmp_path):
    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    picture, original = tmp_path / "picture.png", random_picture((64, 48), seed=12)
    original.save(picture)
    gallery, _, _ = call_inpaint(client, picture, [], mask_blur=0, outpaint=(0, 32, 8, 0))
    out = pixels(Image.open(gallery[0]["image"]))
    assert out.shape == (56, 96, 3)
    np.testing.assert_array_equal(out[8:, :64], pixels(original))


def test_app_reports_bad_inputs(app_url, tmp_path):
    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    picture = tmp_path / "picture.png"
    random_picture((32, 32)).save(picture)
    with pytest.raises(AppError, match="nothing to repaint"):
        call_inpaint(client, picture, [])
    with pytest.raises(AppError, match="No picture"):
        client.predict(None, 1.0, 4, 0, 0, 0, 0, "a cat", "", "euler", 3, 7.5, 0, 0, 1, 1, api_name="/inpaint")


def test_examples_exist_and_fit_their_pictures():
    examples_dir = Path(__file__).resolve().parents[1] / "examples"
    examples = json.loads((examples_dir / "examples.json").read_text())
    for model in ("tiny_shapes", "stable_diffusion"):
        assert examples[model]["inpaint"]
        for example in examples[model]["inpaint"]:
            picture = Image.open(examples_dir / example["image"])
            if "mask" in example:
                mask = read_mask(Image.open(examples_dir / example["mask"]), size=picture.size)
                assert 0 < np.asarray(mask).mean() < 128
            else:
                assert example["outpaint_right"] % 8 == 0 and example["outpaint_right"] > 0


# ------------------------------------------------------------------------------------ full size (--runslow)
def full_size_pair(hub_layouts: Path, *, inpainting: bool):
    """Random networks at SD 1.5's shapes (a 9-channel UNet for SD 1.5 inpainting): diffusers' components and ours."""
    import transformers
    from diffusers import AutoencoderKL as ReferenceVAE
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from test_networks import ours_from, perturb_vectors, read_hub_config

    from stable_diffusion.clip import CLIPTextConfig, CLIPTextModel
    from stable_diffusion.pipelines import StableDiffusion
    from stable_diffusion.schedules import SchedulerConfig
    from stable_diffusion.unet import UNet, UNetConfig
    from stable_diffusion.vae import AutoencoderKL, VAEConfig

    repo = hub_layouts / "stable-diffusion-v1-5"
    torch.manual_seed(0)
    unet_config = read_hub_config(hub_layouts, repo.name, "unet") | {"in_channels": 9 if inpainting else 4}
    vae_config, clip_config = read_hub_config(hub_layouts, repo.name, "vae"), read_hub_config(hub_layouts, repo.name, "text_encoder")
    unet = perturb_vectors(UNet2DConditionModel.from_config(unet_config), seed=0)
    vae = perturb_vectors(ReferenceVAE.from_config(vae_config), seed=1)
    clip = perturb_vectors(transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(clip_config)), seed=2)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(repo / "tokenizer")
    components = dict(unet=unet, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                      scheduler=DDIMScheduler.from_pretrained(repo / "scheduler"), safety_checker=None,
                      feature_extractor=None, requires_safety_checker=False)
    ours = StableDiffusion(
        text_encoder=ours_from(clip, "clip", CLIPTextModel, CLIPTextConfig.from_hub_config(clip_config)),
        unet=ours_from(unet, "unet", UNet, UNetConfig.from_hub_config(unet_config)),
        vae=ours_from(vae, "vae", AutoencoderKL, VAEConfig.from_hub_config(vae_config)),
        tokenizer=tokenizer,
        scheduler=SchedulerConfig.from_hub_config(json.loads((repo / SD15_SCHEDULER).read_text())),
        name="random-sd15",
    )
    return components, ours


@pytest.mark.slow
@pytest.mark.parametrize(("unet", "sampler", "strength"), [("inpainting", "dpmpp_2m_karras", 1.0), ("regular", "ddim", 0.8)])
def test_full_size_inpainting_matches_diffusers(hub_layouts, monkeypatch, unet, sampler, strength):
    components, ours = full_size_pair(hub_layouts, inpainting=unet == "inpainting")
    side, steps = 512, 4
    image, mask = random_picture((side, side), seed=5), box_mask((side, side), (128, 96, 352, 416))
    expected, expected_latents = reference_inpaint(
        components, sampler, prompt="a red cat", image=image, mask_image=mask, strength=strength,
        num_inference_steps=steps, guidance_scale=7.5, height=side, width=side, generator=torch.Generator().manual_seed(8),
    )
    got, latents = our_inpaint(ours, monkeypatch, image, mask, "a red cat", strength=strength, steps=steps,
                               guidance_scale=7.5, sampler=sampler, seed=8)
    inside = np.asarray(mask) > 0
    assert np.abs(got - expected)[inside].max() <= 2
    assert 0.05 < ((expected > 0) & (expected < 255)).mean(), "a saturated picture would prove little"
    scale = float(expected_latents.abs().max())
    assert float((latents - expected_latents).abs().max()) < 1e-4 * scale


def test_fill_paints_the_hole_in_the_colours_around_it() -> None:
    from stable_diffusion.inpainting import fill_masked

    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    picture.paste((30, 30, 200), (0, 32, 64, 64))  # red above, blue below
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # a hole across the border
    filled = np.asarray(fill_masked(picture, mask)).astype(int)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(filled[keep], np.asarray(picture)[keep])
    # Inside the hole, red near the red side and blue near the blue side: the colours around it.
    assert filled[18, 32, 0] > filled[18, 32, 2] and filled[45, 32, 2] > filled[45, 32, 0]
