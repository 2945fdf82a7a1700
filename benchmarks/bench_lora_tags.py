"""What a ``<lora:NAME:W>`` prompt tag costs a request: SD 1.5 with an LCM-LoRA-shaped LoRA, ours against diffusers.

    python benchmarks/bench_lora_tags.py --rounds 3   # -> benchmarks/results/lora-tags.{json,md}

One process holds both pipelines: full-size SD 1.5 with random weights (``make_full_size.py``) and a
random LoRA of the LCM-LoRA's shape (rank 64 on every attention, feed-forward, resnet, time-embedding
and resampling layer of the UNet: 67 M parameters, 135 MB in float16, as
``latent-consistency/lcm-lora-sdv1-5``). Every request is a cheap one (64², 1 LCM step, guidance 1)
with a prompt of its own (no prompt-cache hits), so what differs between requests is the LoRA's cost.

Ours, each round in this order: a request without a tag; with the tag (its LoRA is merged); with the
same tag again (it stayed merged); without a tag (it is taken out). diffusers, as its users apply a
LoRA to one request: a request without LoRA; ``load_lora_weights`` + ``fuse_lora``, the request,
``unfuse_lora`` + ``unload_lora_weights``. Who goes first alternates between rounds. Reported: the
median of each request, and its cost over the plain request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_full_size import default_out, make_full_size  # noqa: E402
from run import bench_threads, log, machine  # noqa: E402

RANK = 64
WEIGHT = 0.7
# The layers the LCM-LoRA for SD 1.5 changes (the ends of their module paths).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
           "time_embedding.linear_1", "time_embedding.linear_2")
REQUEST = dict(width=64, height=64, steps=1, guidance_scale=1.0)


def write_lora(unet, path: Path) -> int:
    """A random PEFT-keyed LoRA for ``unet``'s TARGETS; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    generator, keys = torch.Generator().manual_seed(0), {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(TARGETS):
            weight = module.weight
            down = 0.01 * torch.randn(RANK, *weight.shape[1:], generator=generator)
            up = 0.01 * torch.randn(weight.shape[0], RANK, *[1] * (weight.ndim - 2), generator=generator)
            keys |= {f"unet.{name}.lora_A.weight": down.half(), f"unet.{name}.lora_B.weight": up.half()}
    save_file(keys, path)
    return sum(t.numel() for t in keys.values())


def measure(rounds: int, lora_dir: Path) -> dict:
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    import stable_diffusion

    torch.set_num_threads(bench_threads())
    folder = make_full_size(default_out("sd15"))
    ours = stable_diffusion.load(folder, device="cpu", dtype=torch.float32, lora_dirs=[lora_dir])
    theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    parameters = write_lora(theirs.unet, lora_dir / "lcm.safetensors")
    prompts = (f"a red fox in the snow, photo number {i}" for i in range(10**6))

    def ours_request(tag: str) -> None:
        ours.text_to_image(next(prompts) + tag, sampler="lcm", seed=0, **REQUEST)

    def theirs_request(lora: bool) -> None:
        if lora:
            theirs.load_lora_weights(str(lora_dir), weight_name="lcm.safetensors", adapter_name="lcm")
            theirs.fuse_lora(lora_scale=WEIGHT)
        theirs(next(prompts), height=REQUEST["height"], width=REQUEST["width"], guidance_scale=REQUEST["guidance_scale"],
               num_inference_steps=REQUEST["steps"], generator=torch.Generator().manual_seed(0))
        if lora:
            theirs.unfuse_lora()
            theirs.unload_lora_weights()

    tag = f" <lora:lcm:{WEIGHT}>"
    sequences = {
        "ours": [("ours: no tag", lambda: ours_request("")), ("ours: tag, merged", lambda: ours_request(tag)),
                 ("ours: same tag again", lambda: ours_request(tag)), ("ours: no tag, taken out", lambda: ours_request(""))],
        "diffusers": [("diffusers: no LoRA", lambda: theirs_request(False)),
                      ("diffusers: load + fuse, request, unfuse + unload", lambda: theirs_request(True))],
    }
    for sequence in sequences.values():  # untimed: first calls, and our convolution timing
        for _, request in sequence:
            request()
    seconds: dict[str, list[float]] = {name: [] for sequence in sequences.values() for name, _ in sequence}
    for round_ in range(rounds):
        order = ["ours", "diffusers"] if round_ % 2 == 0 else ["diffusers", "ours"]
        for who in order:
            for name, request in sequences[who]:
                start = time.perf_counter()
                request()
                seconds[name].append(time.perf_counter() - start)
                log(f"round {round_ + 1}: {name}: {seconds[name][-1]:.2f} s")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    base = {"ours": medians["ours: no tag"], "diffusers": medians["diffusers: no LoRA"]}
    rows = [
        {"request": name, "median_s": medians[name], "lora_cost_s": medians[name] - base[name.split(":")[0]],
         "runs_s": seconds[name]}
        for name in seconds
    ]
    return {"machine": machine(), "rounds": rounds, "lora_parameters": parameters, "rank": RANK,
            "request": REQUEST | {"sampler": "lcm"}, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# A `<lora:…>` tag's cost per request: SD 1.5 + an LCM-LoRA-shaped LoRA",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores ({m['threads']} threads), torch {m['torch']}, "
        f"diffusers {m['diffusers']}; float32. {report['date']}.",
        f"LoRA: rank {report['rank']}, {report['lora_parameters'] / 1e6:.1f} M parameters (random, PEFT keys). "
        f"Requests: 64², 1 LCM step, guidance 1, a new prompt each; medians of {report['rounds']} alternating rounds.",
        "",
        "| request | median (s) | LoRA's cost (s) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['request']} | {r['median_s']:.2f} | {r['lora_cost_s']:+.2f} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora-tags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as lora_dir:
        report = measure(args.rounds, Path(lora_dir))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
