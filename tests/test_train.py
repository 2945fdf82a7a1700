"""Training: the shapes dataset and its analyzer, the objectives against diffusers' reference
implementations, and the loop end to end (checkpoints in the diffusers layout, exact resume,
captioned image folders, the command line)."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stable_diffusion import hub
from stable_diffusion.schedules import SchedulerConfig, alphas_cumprod_from_config
from stable_diffusion.train import (
    EMA,
    CaptionedImageFolder,
    TrainConfig,
    diffusion_loss,
    drop_captions,
    kl_divergence,
    main,
    tokenize,
    train,
)
from stable_diffusion.unet import UNet, UNetConfig
from stable_diffusion.vae import DiagonalGaussian
from tiny_shapes.__main__ import main as tiny_shapes_main
from tiny_shapes.dataset import (
    COLORS,
    HELD_OUT,
    SHAPES,
    ShapesDataset,
    all_combinations,
    draw_scene,
    random_scene,
    split_combinations,
)
from tiny_shapes.recipe import tiny_shapes_pipeline, train_config
from tiny_shapes.scoring import analyze, parse_caption, score
from tiny_shapes.tokenizer import learn_bpe_tokenizer

TOL = 1e-4


# ------------------------------------------------------------------------------ dataset and analyzer
def test_splits_hold_out_a_fixed_list_and_keep_every_word_in_training():
    combinations = all_combinations()
    assert len(combinations) == len(SHAPES) * len(COLORS) * (len(COLORS) - 1) == 168
    train_split, held_out = split_combinations("train"), split_combinations("held_out")
    assert set(held_out) == set(HELD_OUT) and len(held_out) == 12
    assert not set(train_split) & set(held_out)
    assert len(train_split) + len(held_out) == len(combinations)
    assert {c.shape for c in train_split} == set(SHAPES)
    assert {c.color for c in train_split} == {c.background for c in train_split} == set(COLORS)
    with pytest.raises(ValueError, match="train, held_out, all"):
        split_combinations("test")


def test_dataset_items_are_deterministic_and_in_the_training_split():
    dataset = ShapesDataset(resolution=32, seed=3)
    first, again = dataset[7], ShapesDataset(resolution=32, seed=3)[7]
    assert first["caption"] == again["caption"] and torch.equal(first["pixels"], again["pixels"])
    assert first["pixels"].shape == (3, 32, 32) and -1 <= first["pixels"].min() and first["pixels"].max() <= 1
    held_out = set(HELD_OUT)
    assert all(parse_caption(dataset[i]["caption"]) not in held_out for i in range(300))
    assert ShapesDataset(resolution=32, seed=4).scene(7) != dataset.scene(7)
    assert ShapesDataset(resolution=32, split="held_out").scene(0).combination in held_out


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyzer_reads_the_ground_truth_of_every_combination(resolution):
    rng = random.Random(resolution)
    wrong = []
    for combination in all_combinations():
        for _ in range(2):  # two random sizes and places each
            scene = random_scene(rng, [combination])
            if not score(draw_scene(scene, resolution), combination)["all"]:
                wrong.append((scene, analyze(draw_scene(scene, resolution))))
    assert not wrong, wrong[:3]


def test_analyzer_fill_ratios_and_failures():
    rng = random.Random(0)
    ratios = {shape: [] for shape in SHAPES}
    for combination in all_combinations()[::5]:
        ratios[combination.shape].append(analyze(draw_scene(random_scene(rng, [combination]), 32)).fill_ratio)
    assert 0.5 <= min(ratios["triangle"]) and max(ratios["triangle"]) < 0.62  # ideal 1/2
    assert abs(np.mean(ratios["circle"]) - np.pi / 4) < 0.01
    assert min(ratios["square"]) > 0.98
    blank = Image.new("RGB", (32, 32), COLORS["green"])
    assert analyze(blank).shape == "none" and analyze(blank).background == "green"
    assert not score(blank, parse_caption("a red circle on a green background"))["all"]
    with pytest.raises(ValueError, match="colors red, orange"):
        parse_caption("a cat on a mat")


# ------------------------------------------------------------------------------ tokenizer
def test_learned_tokenizer_gives_one_token_per_caption_word(tmp_path):
    from transformers import CLIPTokenizer

    captions = [c.caption for c in all_combinations()]
    tokenizer = learn_bpe_tokenizer(captions, tmp_path, model_max_length=16)
    reread = CLIPTokenizer.from_pretrained(tmp_path)  # just vocab.json + merges.txt
    for caption in captions:
        ids = tokenizer(caption).input_ids
        assert ids == reread(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    # Words never seen still encode (byte by byte) and decode back.
    assert tokenizer.decode(tokenizer("A Zebra, 42!").input_ids, skip_special_tokens=True) == "a zebra , 4 2 !"
    assert len(tokenizer) == 512 + len((tmp_path / "merges.txt").read_text().splitlines()) - 1 + 2
    padded = tokenize(tokenizer, ["a red circle on a blue background", ""], length=16)
    assert padded.shape == (2, 16)
    assert padded[1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (padded[1, 2:] == tokenizer.pad_token_id).all()


# ------------------------------------------------------------------------------ objectives vs diffusers
def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_levels=(True, False),
                           num_heads=(2, 2), cross_attention_dim=16, norm_num_groups=8, sample_size=8))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_matches_diffusers_noising_and_targets(prediction_type):
    from diffusers import DDPMScheduler

    config = SchedulerConfig(prediction_type=prediction_type)
    reference = DDPMScheduler.from_config(config.to_hub_config(class_name="DDPMScheduler"))
    unet = _tiny_unet()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    context = torch.randn(4, 5, 16, generator=generator)
    t = torch.tensor([0, 250, 600, 999])

    ours = diffusion_loss(unet, x0, context, t=t, noise=noise, alphas_cumprod=alphas_cumprod_from_config(config),
                          prediction_type=prediction_type)
    noisy = reference.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else reference.get_velocity(x0, noise, t)
    with torch.no_grad():
        expected = ((unet(noisy, t, context) - target) ** 2).mean()
    assert abs(ours.item() - expected.item()) < TOL
    ours.backward()  # the loss trains the UNet
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0


def test_kl_divergence_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = DiagonalGaussianDistribution(moments).kl()  # summed over each item's latent elements
    ours = kl_divergence(DiagonalGaussian.from_moments(moments))
    assert abs(ours.item() - (reference / (4 * 4 * 4)).mean().item()) < TOL


def test_ema_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    model = _tiny_unet()
    ours = EMA(model, decay=0.9)
    reference = EMAModel(model.parameters(), decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        reference.step(model.parameters())
    difference = max(
        (a - b).abs().max().item() for a, b in zip(ours.averaged.parameters(), reference.shadow_params)
    )
    assert difference < 1e-6
    assert int(ours.num_updates) == 5 and ours.current_decay() == pytest.approx(min(0.9, 6 / 15))


def test_drop_captions_and_learning_rate_schedule():
    captions = ["a red circle on a blue background"] * 10_000
    generator = torch.Generator().manual_seed(0)
    dropped = drop_captions(captions, 0.1, generator=generator)
    assert abs(dropped.count("") / len(captions) - 0.1) < 0.01
    assert drop_captions(captions[:5], 0.0) == captions[:5] and drop_captions(captions[:5], 1.0) == [""] * 5
    config = TrainConfig(steps=110, warmup_steps=10, learning_rate=1.0, lr_schedule="cosine")
    assert config.learning_rate_at(0) == pytest.approx(0.1) and config.learning_rate_at(9) == pytest.approx(1.0)
    assert config.learning_rate_at(60) == pytest.approx(0.5) and config.learning_rate_at(110) == pytest.approx(0.0)
    assert TrainConfig(lr_schedule="constant", warmup_steps=0).learning_rate_at(10**6) == 1e-4
    with pytest.raises(ValueError, match="no, fp16, bf16"):
        TrainConfig(mixed_precision="fp8")


# ------------------------------------------------------------------------------ the loop end to end
TINY = {"batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "keep_checkpoints": 5}


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.detach().cpu().clone() for net in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, net).state_dict().items()}


def test_init_command_saves_a_loadable_tiny_model_with_a_clip_tokenizer(tmp_path):
    assert tiny_shapes_main(["init", "--output", str(tmp_path / "init")]) == 0
    pipe = hub.load(tmp_path / "init", device="cpu", dtype=torch.float32)
    assert pipe.native_size == 32 and pipe.text_encoder.config.max_position_embeddings == 16
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "init" / "tokenizer").iterdir()}
    ids = pipe.tokenizer("a red circle on a blue background").input_ids
    assert len(ids) == 9 and max(ids) < pipe.text_encoder.config.vocab_size


def test_shapes_command_line_trains_a_stage_on_the_shapes_stream(tmp_path):
    assert tiny_shapes_main(["init", "--output", str(tmp_path / "init")]) == 0
    assert tiny_shapes_main(["vae", "--model", str(tmp_path / "init"), "--output", str(tmp_path / "vae"), "--steps", "1",
                             "--batch-size", "2", "--warmup-steps", "1", "--kl-weight", "0.001"]) == 0
    init = hub.load(tmp_path / "init", device="cpu", dtype=torch.float32)
    vae = hub.load(tmp_path / "vae", device="cpu", dtype=torch.float32)
    assert vae.vae.config.scaling_factor != init.vae.config.scaling_factor == 1.0
    assert not torch.equal(vae.vae.encoder.conv_in.weight, init.vae.encoder.conv_in.weight)
    assert torch.equal(vae.unet.conv_in.weight, init.unet.conv_in.weight)
    assert tiny_shapes_main(["init", "--output", str(tmp_path / "odd"), "--resolution", "30"]) == 2
    # The core command line trains on a folder: it has no shapes stream to fall back on.
    with pytest.raises(SystemExit):
        main(["vae", "--model", str(tmp_path / "init"), "--output", str(tmp_path / "x")])


def test_the_core_package_never_imports_the_toy_model():
    package = Path(__file__).resolve().parent.parent / "stable_diffusion"
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "tiny_shapes"]
    assert not offenders


def test_vae_stage_sets_the_scaling_factor_and_saves_a_loadable_model(tmp_path):
    pipe = tiny_shapes_pipeline()
    config = train_config(steps=2, **TINY)
    trained = train(pipe, ShapesDataset(resolution=32), stage="vae", config=config, output=tmp_path / "vae")
    factor = trained.vae.config.scaling_factor
    assert factor != 1.0 and factor > 0
    loaded = hub.load(tmp_path / "vae", device="cpu", dtype=torch.float32)
    assert loaded.vae.config.scaling_factor == pytest.approx(factor)
    for name, tensor in trained.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[name], tensor.cpu()), name
    assert [p.name for p in (tmp_path / "vae" / "checkpoints").iterdir()] == ["step-0000002"]


def test_resumed_diffusion_training_equals_an_uninterrupted_run(tmp_path):
    config = train_config(steps=4, train_text_encoder=True, caption_dropout=0.5, **TINY)
    data = ShapesDataset(resolution=32)
    straight = train(tiny_shapes_pipeline(), data, stage="diffusion", config=config, output=tmp_path / "a")
    checkpoints = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]

    # As if the run had crashed after step 2: a fresh process resumes from the step-2 checkpoint.
    resumed = train(tiny_shapes_pipeline(), data, stage="diffusion", config=config, output=tmp_path / "b",
                    resume=str(tmp_path / "a" / "checkpoints" / "step-0000002"))
    expected, got = _weights(straight), _weights(resumed)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6
    assert json.loads((tmp_path / "b/checkpoints/step-0000004/training_state/progress.json").read_text())["step"] == 4
    # The checkpoint itself is a model that load() reads: the averaged weights.
    checkpoint = hub.load(tmp_path / "b/checkpoints/step-0000004", device="cpu", dtype=torch.float32)
    assert torch.equal(checkpoint.unet.conv_in.weight, resumed.unet.conv_in.weight.cpu())
    assert not torch.equal(resumed.unet.conv_in.weight.cpu(), tiny_shapes_pipeline().unet.conv_in.weight)
    # The frozen VAE is untouched.
    assert torch.equal(resumed.vae.encoder.conv_in.weight.cpu(), tiny_shapes_pipeline().vae.encoder.conv_in.weight)


def test_captioned_folder_dataset_and_a_fine_tuning_step(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (60, 40), (255, 0, 0)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a red thing\n")
    Image.new("RGB", (32, 48), (0, 0, 255)).save(folder / "sub" / "tall.jpg")
    (folder / "sub" / "tall.txt").write_text("a blue thing")
    dataset = CaptionedImageFolder(folder, resolution=32)
    items = sorted((dataset[i]["caption"], dataset[i]["pixels"]) for i in range(len(dataset)))
    assert [caption for caption, _ in items] == ["a blue thing", "a red thing"]
    assert all(pixels.shape == (3, 32, 32) for _, pixels in items)
    assert items[1][1][0].mean() == pytest.approx(1.0) and items[1][1][2].mean() == pytest.approx(-1.0)

    # One optimisation step of "fine-tuning" on the folder, starting from a saved model as load() returns it.
    assert tiny_shapes_main(["init", "--output", str(tmp_path / "base")]) == 0
    assert main(["diffusion", "--model", str(tmp_path / "base"), "--data", str(folder), "--output", str(tmp_path / "tuned"),
                 "--steps", "3", "--batch-size", "2", "--checkpoint-every", "10", "--warmup-steps", "1"]) == 0
    base = hub.load(tmp_path / "base", device="cpu", dtype=torch.float32)
    tuned = hub.load(tmp_path / "tuned", device="cpu", dtype=torch.float32)
    assert not torch.equal(base.unet.conv_in.weight, tuned.unet.conv_in.weight)
    assert torch.equal(base.text_encoder.token_embedding.weight, tuned.text_encoder.token_embedding.weight)

    assert main(["diffusion", "--model", str(tmp_path / "base"), "--data", str(folder), "--output", str(tmp_path / "x"),
                 "--batch-size", "3"]) == 2  # two images make no full batch of three

    (folder / "orphan.png").write_bytes((folder / "wide.png").read_bytes())
    with pytest.raises(ValueError, match="orphan.txt"):
        CaptionedImageFolder(folder, resolution=32)
    assert main(["diffusion", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "nowhere"),
                 "--output", str(tmp_path / "x")]) == 2
