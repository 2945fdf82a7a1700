"""Shared test configuration.

Tests marked ``slow`` build full-size Stable Diffusion networks (GBs of RAM, minutes of CPU);
they are skipped unless ``--runslow`` is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
HUB_LAYOUTS = FIXTURES / "hub-layouts"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    # The CI tests run tiny networks for which thread start-up costs more than it saves, and
    # a second busy process (the app server under test) makes OpenMP's spinning threads fight
    # over the 2 cores: one thread is many times faster here. Full-size checks keep them all.
    if not config.getoption("--runslow"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="full-size check: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def assert_same_picture(ours, reference) -> None:
    """Two 8-bit pictures of the same latents, up to the rounding noise of float32 kernels.

    What is guaranteed across CPU kinds is the noise (each image's own CPU generator) and the
    arithmetic up to summation order. A batch of two and a single image, or 1 and 2 threads, run
    other convolution and matmul kernels that sum in another order (not bit-identical on every
    CPU: seen on an AMD EPYC, not on an Intel Xeon). The last-bit differences of the float32
    latents can flip the rounding of a pixel to 8 bits: at most a level or two, at a few pixels.
    """
    ours, reference = np.asarray(ours, dtype=np.int16), np.asarray(reference, dtype=np.int16)
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    assert difference.max() <= 2, f"{difference.max()} levels apart"
    assert (difference > 0).mean() < 0.01, f"{(difference > 0).mean():.2%} of the values differ"


class ScriptedClock:
    """A clock for the CPU measurements (``devices``' precision probe, ``cpu_conv``): each timed run
    lasts the next of ``durations`` seconds, cycled. A measurement reads the clock twice per timed
    run and alternates its contestants, so ``ScriptedClock(1.0, 2.0)`` makes the first 1 s, the second 2 s.
    """

    def __init__(self, *durations: float) -> None:
        self.durations = durations
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        if self.reads % 2 == 1:  # the end of a run
            self.now += self.durations[(self.reads // 2) % len(self.durations)]
        self.reads += 1
        return self.now


@pytest.fixture
def fresh_cpu_measurements(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty cache folder, no answer remembered from earlier in this process, no override: the
    CPU measurements (precision probe, convolution algorithms) start as on a new machine."""
    from stable_diffusion import cpu_conv, devices

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(devices.CPU_DTYPE_ENV, raising=False)
    monkeypatch.delenv(cpu_conv.CPU_CONV_ENV, raising=False)
    monkeypatch.setattr(devices, "_probed", {})
    monkeypatch.setattr(cpu_conv, "_choices", {})


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hub_layouts() -> Path:
    """The real configs and tokenizer files of the SD 1.5 / 2.1 / 2.1-base Hub repos (no weights)."""
    return HUB_LAYOUTS


def build_tiny_reference_pipeline(kind: str = "sd1", seed: int = 0):
    """A diffusers ``StableDiffusionPipeline`` with tiny random networks shaped like SD 1.x or 2.x.

    The reference implementation (test-only): tests save it in the Hub's layout and check that our
    package loads it and computes the same numbers.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    repo = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1"}[kind]
    torch.manual_seed(seed)
    context_dim = 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=(2, 4) if kind == "sd2" else 2,
        use_linear_projection=kind == "sd2",
        upcast_attention=kind == "sd2",
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=context_dim,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if kind == "sd2" else "quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(HUB_LAYOUTS / repo / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(HUB_LAYOUTS / repo / "scheduler")
    for net in (unet, vae, text_encoder):
        net.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x-shaped model saved by diffusers in the Hub's folder layout."""
    folder = tmp_path_factory.mktemp("tiny-sd1")
    build_tiny_reference_pipeline("sd1").save_pretrained(folder)
    # SD 1.5's own scheduler file, as on the Hub: save_pretrained would write DDIM's defaults into it
    # (timestep_spacing "leading"), which SD 1.5's file leaves to each scheduler class.
    scheduler_config = "scheduler/scheduler_config.json"
    (folder / scheduler_config).write_text((HUB_LAYOUTS / "stable-diffusion-v1-5" / scheduler_config).read_text())
    return folder
