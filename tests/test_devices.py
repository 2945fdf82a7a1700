"""The CPU precision probe (devices.fastest_cpu_dtype): its decision, its cache, its override.

No test depends on this machine's speed: the timings are given, or the probe's clock is replaced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ScriptedClock
from stable_diffusion import devices


pytestmark = pytest.mark.usefixtures("fresh_cpu_measurements")


class CountingProbe:
    """Stands in for ``measure_cpu_dtypes``: returns ``timings`` and counts its calls."""

    def __init__(self, float32: float, bfloat16: float) -> None:
        self.timings = {"float32": float32, "bfloat16": bfloat16}
        self.calls = 0

    def __call__(self) -> dict[str, float]:
        self.calls += 1
        return dict(self.timings)


@pytest.mark.parametrize(
    ("float32", "bfloat16", "expected"),
    [
        (2.91, 1.31, torch.bfloat16),  # AMD Zen 4, a 256² UNet step (the figures)
        (6.6, 11.1, torch.float32),  # Intel Xeon without AMX: bf16 slower
        (1.0, 0.9, torch.float32),  # a 10% gain is not worth bf16's precision
        (1.0, 1.0 / devices.BF16_MIN_SPEEDUP, torch.bfloat16),
    ],
)
def test_decision_follows_the_timings(float32: float, bfloat16: float, expected: torch.dtype) -> None:
    assert devices.faster_dtype({"float32": float32, "bfloat16": bfloat16}) == expected


@pytest.fixture
def no_op_mix(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, torch.dtype]]:
    """The op mix replaced by a no-op (only the fake clock decides); records the mixes built."""
    built = []

    def op_mix(channels: int, side: int, dtype: torch.dtype):
        built.append((channels, side, dtype))
        return lambda: None

    monkeypatch.setattr(devices, "_op_mix", op_mix)
    return built


@pytest.mark.parametrize(("bfloat16", "expected"), [(0.5, torch.bfloat16), (1.5, torch.float32)])
def test_probe_measures_both_rounds_with_its_clock(monkeypatch: pytest.MonkeyPatch, no_op_mix, bfloat16: float, expected) -> None:
    clock = ScriptedClock(1.0, bfloat16)
    monkeypatch.setattr(devices, "_clock", clock)
    timings = devices.measure_cpu_dtypes()
    assert timings == {"float32": 1.0, "bfloat16": bfloat16}
    assert clock.reads == 2 * 2 * (10 + 3)  # both rounds ran: 10 and 3 timed runs per precision
    assert [(channels, side) for channels, side, _ in no_op_mix] == [(64, 8), (64, 8), (320, 16), (320, 16)]
    assert devices.default_dtype("cpu") == expected


def test_probe_stops_after_the_small_round_when_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch, no_op_mix) -> None:
    clock = ScriptedClock(1.0, devices.EMULATED_SLOWDOWN * 2)
    monkeypatch.setattr(devices, "_clock", clock)
    assert devices.measure_cpu_dtypes()["bfloat16"] == devices.EMULATED_SLOWDOWN * 2
    assert clock.reads == 2 * 2 * 10


def test_real_probe_returns_timings_for_both_precisions() -> None:
    timings = devices.measure_cpu_dtypes()
    assert set(timings) == {"float32", "bfloat16"}
    assert all(0 < seconds < math.inf for seconds in timings.values())


def test_answer_is_cached_per_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CountingProbe(float32=2.0, bfloat16=1.0)
    monkeypatch.setattr(devices, "measure_cpu_dtypes", probe)
    assert devices.default_dtype("cpu") == torch.bfloat16
    assert devices.default_dtype("cpu") == torch.bfloat16
    assert probe.calls == 1
    cache = json.loads(devices.probe_cache_file().read_text())
    assert cache == {devices.machine_key(): {"dtype": "bfloat16", "float32_s": 2.0, "bfloat16_s": 1.0}}
    # A new process reads the file instead of probing.
    monkeypatch.setattr(devices, "_probed", {})
    probe.timings = {"float32": 1.0, "bfloat16": 2.0}
    assert devices.default_dtype("cpu") == torch.bfloat16 and probe.calls == 1
    # Another machine (or torch version, or thread count) probes again; both answers are kept.
    monkeypatch.setattr(devices, "machine_key", lambda: "another CPU | torch 9 | 2 threads")
    assert devices.default_dtype("cpu") == torch.float32 and probe.calls == 2
    assert set(json.loads(devices.probe_cache_file().read_text())) == {
        "another CPU | torch 9 | 2 threads",
        *cache,
    }


def test_machine_key_names_cpu_torch_and_threads() -> None:
    key = devices.machine_key()
    assert torch.__version__ in key and f"{torch.get_num_threads()} threads" in key


def test_a_corrupt_cache_is_probed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    path = devices.probe_cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    probe = CountingProbe(float32=1.0, bfloat16=3.0)
    monkeypatch.setattr(devices, "measure_cpu_dtypes", probe)
    assert devices.default_dtype("cpu") == torch.float32 and probe.calls == 1
    assert json.loads(path.read_text())[devices.machine_key()]["dtype"] == "float32"


def test_an_unwritable_cache_only_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # no folder can be made under a file
    monkeypatch.setattr(devices, "measure_cpu_dtypes", CountingProbe(float32=2.0, bfloat16=1.0))
    assert devices.default_dtype("cpu") == torch.bfloat16
    assert "Could not cache a CPU measurement" in caplog.text


@pytest.mark.parametrize(("value", "expected"), [("bfloat16", torch.bfloat16), ("fp32", torch.float32), (" BF16 ", torch.bfloat16)])
def test_environment_override_skips_the_probe(monkeypatch: pytest.MonkeyPatch, value: str, expected) -> None:
    probe = CountingProbe(float32=1.0, bfloat16=1.0)
    monkeypatch.setattr(devices, "measure_cpu_dtypes", probe)
    monkeypatch.setenv(devices.CPU_DTYPE_ENV, value)
    assert devices.default_dtype("cpu") == expected
    assert probe.calls == 0 and not devices.probe_cache_file().exists()


def test_override_auto_probes_and_a_bad_override_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "measure_cpu_dtypes", CountingProbe(float32=2.0, bfloat16=1.0))
    monkeypatch.setenv(devices.CPU_DTYPE_ENV, "auto")
    assert devices.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(devices.CPU_DTYPE_ENV, "double")
    with pytest.raises(ValueError, match=r"SD_CPU_DTYPE: Unknown dtype 'double': choose one of .*bfloat16.*float32"):
        devices.default_dtype("cpu")


def test_gpus_get_float16_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CountingProbe(float32=1.0, bfloat16=1.0)
    monkeypatch.setattr(devices, "measure_cpu_dtypes", probe)
    assert devices.default_dtype("cuda") == torch.float16
    assert devices.default_dtype(torch.device("mps")) == torch.float16
    assert probe.calls == 0
