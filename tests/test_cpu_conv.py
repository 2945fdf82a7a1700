"""cpu_conv: the im2col convolution equals F.conv2d; the measured choice of algorithm, its cache, its override.

No test depends on this machine's speed: the measurement's clock is replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ScriptedClock
from stable_diffusion import cpu_conv, devices
from stable_diffusion.layers import Conv2d


pytestmark = pytest.mark.usefixtures("fresh_cpu_measurements")


class Calls:
    """Counts the runs of each algorithm (wrapping them, so the numbers stay real)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = {"onednn": 0, "im2col": 0}
        conv2d, im2col = F.conv2d, cpu_conv.im2col_conv2d

        def counted(name, run):
            def wrapper(*args, **kwargs):
                self.counts[name] += 1
                return run(*args, **kwargs)

            return wrapper

        monkeypatch.setattr(F, "conv2d", counted("onednn", conv2d))
        monkeypatch.setattr(cpu_conv, "im2col_conv2d", counted("im2col", im2col))

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {"onednn": 0, "im2col": 0}
        return counts


def wide_conv(in_channels: int = 256, out_channels: int = 256, **kwargs) -> Conv2d:
    """A 3×3 convolution that, on an 8² map (0.08 GFLOP at 256 channels), is near the measured size."""
    torch.manual_seed(0)
    conv = Conv2d(in_channels, out_channels, kernel_size=kwargs.pop("kernel_size", 3), padding=kwargs.pop("padding", 1), **kwargs)
    return conv.requires_grad_(False)


def cache_entries() -> dict[str, str]:
    return json.loads(devices.probe_cache_file(cpu_conv.CACHE_FILE).read_text())[devices.machine_key()]


@pytest.mark.parametrize(
    ("batch", "channels", "size", "out_channels", "kernel", "stride", "padding", "bias"),
    [
        (1, 8, (8, 8), 16, 3, 1, 1, True),
        (2, 8, (10, 6), 4, 3, 1, 1, True),  # a batch, a map that is not square
        (1, 8, (9, 7), 8, 3, 2, 1, False),  # stride 2 on odd sides (the UNet's Downsample), no bias
        (2, 8, (9, 9), 8, 3, 2, 0, True),  # stride 2 without padding (the VAE's asymmetric Downsample)
        (2, 16, (8, 5), 8, 1, 1, 0, True),  # 1×1: the map itself is the patch matrix
        (1, 16, (8, 8), 8, 1, 2, 0, True),  # 1×1 with a stride still unfolds
    ],
)
def test_im2col_equals_conv2d(batch, channels, size, out_channels, kernel, stride, padding, bias) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, *size, generator=generator)
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator)
    b = torch.randn(out_channels, generator=generator) if bias else None
    expected = F.conv2d(x, weight, b, stride=stride, padding=padding)
    ours = cpu_conv.im2col_conv2d(x, weight, b, (stride, stride), (padding, padding))
    assert ours.shape == expected.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_im2col_in_bfloat16_stays_within_bfloat16_rounding() -> None:
    generator = torch.Generator().manual_seed(2)
    x, weight = torch.randn(1, 32, 8, 8, generator=generator), torch.randn(16, 32, 3, 3, generator=generator) / 17
    expected = F.conv2d(x, weight, padding=1)
    ours = cpu_conv.im2col_conv2d(x.bfloat16(), weight.bfloat16(), None, (1, 1), (1, 1))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, rtol=0.03, atol=0.03)


@pytest.mark.parametrize(("im2col", "onednn", "chosen"), [(1.0, 3.0, "im2col"), (1.0, 1.05, "onednn"), (2.0, 1.0, "onednn")])
def test_the_faster_algorithm_is_kept_and_cached(monkeypatch: pytest.MonkeyPatch, im2col, onednn, chosen) -> None:
    monkeypatch.setattr(cpu_conv, "MIN_FLOPS", 0)
    clock = ScriptedClock(im2col, onednn)
    monkeypatch.setattr(cpu_conv, "_clock", clock)
    conv, x = wide_conv(32, 32), torch.randn(1, 32, 8, 8)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    calls = Calls(monkeypatch)
    with torch.inference_mode():
        first = conv(x)
        # Measured once: an untimed warm-up of each, then each timed twice; the winner's output is returned.
        assert calls.take() == {"onednn": 3, "im2col": 3} and clock.reads == 8
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
        assert cache_entries() == {"float32 1x32x8x8 -> 32 k3x3 s1x1 p1x1": chosen}
        # Known now: one run, by the winner, no timing.
        assert torch.equal(conv(x), first)
    assert calls.take() == {"onednn": 0, "im2col": 0} | {chosen: 1} and clock.reads == 8


def test_one_busy_moment_does_not_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_conv, "MIN_FLOPS", 0)
    # im2col's first timed run is disturbed (5 s), its second is not (1 s); oneDNN takes 2 s both times.
    monkeypatch.setattr(cpu_conv, "_clock", ScriptedClock(5.0, 2.0, 1.0, 2.0))
    with torch.inference_mode():
        wide_conv(16, 16)(torch.randn(1, 16, 8, 8))
    assert cache_entries() == {"float32 1x16x8x8 -> 16 k3x3 s1x1 p1x1": "im2col"}


def test_each_shape_is_measured_once_and_a_new_process_reads_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_conv, "MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_conv, "_clock", ScriptedClock(1.0, 2.0))
    conv = wide_conv(16, 16)
    with torch.inference_mode():
        conv(torch.randn(1, 16, 8, 8))
        conv(torch.randn(2, 16, 8, 8))  # another batch is another shape
        conv(torch.randn(1, 16, 8, 8))
    assert set(cache_entries()) == {"float32 1x16x8x8 -> 16 k3x3 s1x1 p1x1", "float32 2x16x8x8 -> 16 k3x3 s1x1 p1x1"}

    def no_clock() -> float:
        raise AssertionError("a cached shape was timed again")

    monkeypatch.setattr(cpu_conv, "_choices", {})
    monkeypatch.setattr(cpu_conv, "_clock", no_clock)
    calls = Calls(monkeypatch)
    with torch.inference_mode():
        conv(torch.randn(2, 16, 8, 8))
    assert calls.take() == {"onednn": 0, "im2col": 1}
    # Another machine (or thread count) measures again; both answers are kept.
    monkeypatch.setattr(devices, "machine_key", lambda: "another CPU | torch 9 | 2 threads")
    monkeypatch.setattr(cpu_conv, "_clock", ScriptedClock(2.0, 1.0))
    with torch.inference_mode():
        conv(torch.randn(2, 16, 8, 8))
    cache = json.loads(devices.probe_cache_file(cpu_conv.CACHE_FILE).read_text())
    assert cache["another CPU | torch 9 | 2 threads"] == {"float32 2x16x8x8 -> 16 k3x3 s1x1 p1x1": "onednn"}
    assert len(cache) == 2


def test_a_corrupt_or_unwritable_cache_only_costs_a_measurement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    monkeypatch.setattr(cpu_conv, "MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_conv, "_clock", ScriptedClock(1.0, 2.0))
    path = devices.probe_cache_file(cpu_conv.CACHE_FILE)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with torch.inference_mode():
        wide_conv(16, 16)(torch.randn(1, 16, 8, 8))
    assert cache_entries() == {"float32 1x16x8x8 -> 16 k3x3 s1x1 p1x1": "im2col"}
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    monkeypatch.setattr(cpu_conv, "_choices", {})
    with torch.inference_mode():
        out = wide_conv(16, 16)(torch.randn(1, 16, 8, 8))
    assert out.shape == (1, 16, 8, 8) and "Could not cache a CPU measurement" in caplog.text


def test_what_is_never_measured_runs_conv2d(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("measured")

    monkeypatch.setattr(cpu_conv, "_clock", no_clock)
    calls = Calls(monkeypatch)
    wide, x = wide_conv(), torch.randn(1, 256, 16, 16)  # 0.3 GFLOP: worth measuring in inference
    with torch.no_grad():
        wide_conv(8, 8)(torch.randn(1, 8, 8, 8))  # too small to pay for its timing
        wide_conv().double()(x.double())  # float64
        wide(x.contiguous(memory_format=torch.channels_last))
        wide_conv(groups=2)(x)
        wide_conv(dilation=2, padding=2)(x)
        wide_conv(padding_mode="reflect")(x)
        monkeypatch.setattr(cpu_conv, "MAX_UNFOLD_BYTES", 1024)
        wide(x)  # its unfolded patches would be too large
    wide.requires_grad_(True)(x)  # training: autograd records conv2d
    assert calls.take() == {"onednn": 8, "im2col": 0}
    assert not devices.probe_cache_file(cpu_conv.CACHE_FILE).exists()


@pytest.mark.parametrize("algorithm", cpu_conv.ALGORITHMS)
def test_the_environment_forces_an_algorithm_for_every_size(monkeypatch: pytest.MonkeyPatch, algorithm: str) -> None:
    monkeypatch.setenv(cpu_conv.CPU_CONV_ENV, f" {algorithm.upper()} ")
    calls = Calls(monkeypatch)
    with torch.inference_mode():
        wide_conv(8, 8)(torch.randn(1, 8, 8, 8))
        wide_conv()(torch.randn(1, 256, 16, 16))
    assert calls.take()[algorithm] == 2
    assert not devices.probe_cache_file(cpu_conv.CACHE_FILE).exists()


def test_a_bad_override_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_conv.CPU_CONV_ENV, "winograd")
    with pytest.raises(ValueError, match="SD_CPU_CONV='winograd': use one of onednn, im2col, or leave it unset"):
        with torch.inference_mode():
            wide_conv(8, 8)(torch.randn(1, 8, 8, 8))
