"""Unfuse cost and forward speed, measured side by side in one run (ratios, not absolute claims).

    .venv/bin/python benchmarks/bench_unfuse.py [--repeats 7] [--skip-modelopt]

1. A Gemma-4-26B-A4B-sized experts layer (hidden 2816, moe_intermediate 704, 128 experts, bf16):
   unfuse time per layer (target <= 30 ms) and extra peak memory (target <= 1% of the layer's bytes).
2. Forward speed (hidden 1024, I 512, 64 experts, top-8, 2048 tokens, bf16): unfused forward and
   the same through modelopt with every quantizer disabled, each over the original eager forward
   (target <= 1.00). Runs alternate A/B/A/B so machine noise hits both sides alike; medians are used.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
from torch import nn
from transformers import Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

import moe_unfuse


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def experts_layer(hidden: int, inter: int, num_experts: int, init: bool) -> Gemma4TextExperts:
    config = Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        module = Gemma4TextExperts(config)
    module.to_empty(device="cpu")
    module.to(torch.bfloat16)
    if init:
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
    return module


def bench_unfuse(repeats: int) -> None:
    moe_unfuse.unfuse(experts_layer(64, 40, 4, init=False), "gemma4")  # warm-up: imports, spec loading
    module = experts_layer(2816, 704, 128, init=False)
    layer_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    peak_before = rss_peak_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        moe_unfuse.unfuse(module, "gemma4")
        times.append(time.perf_counter() - t0)
        moe_unfuse.fuse(module)
    extra_peak = max(rss_peak_bytes() - peak_before, 0)
    ms = statistics.median(times) * 1e3
    print(f"[unfuse] layer {layer_bytes / 2**30:.2f} GiB (H 2816, I 704, 128 experts, bf16), {repeats} runs")
    print(f"  unfuse time per layer   median {ms:7.2f} ms   target 30 ms   ratio {ms / 30:.2f}")
    print(
        f"  extra peak memory        {extra_peak / 2**20:7.2f} MiB  target {layer_bytes * 0.01 / 2**20:.1f} MiB (1%)   ratio {extra_peak / (layer_bytes * 0.01):.3f}"
    )


class Harness(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, *args):
        return self.experts(*args)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - t0


def bench_forward(repeats: int, with_modelopt: bool) -> None:
    torch.manual_seed(0)
    original = experts_layer(1024, 512, 64, init=True)
    tokens, top_k = 2048, 8
    hidden = torch.randn(tokens, 1024, dtype=torch.bfloat16)
    scores = torch.randn(tokens, 64)
    weights, index = scores.topk(top_k, dim=-1)
    weights = torch.softmax(weights, -1).to(torch.bfloat16)
    args = (hidden, index, weights)

    unfused = copy.deepcopy(original)
    moe_unfuse.unfuse(unfused, "gemma4")
    contenders = {"unfused": unfused}
    if with_modelopt:
        import modelopt.torch.quantization as mtq

        moe_unfuse.register("gemma4")
        quant = Harness(copy.deepcopy(original))
        mtq.quantize(quant, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=lambda m: m(*args))
        mtq.disable_quantizer(quant, "*")
        contenders["modelopt, quantizers off"] = quant

    with torch.no_grad():
        reference = original(*args)
        for name, module in contenders.items():
            assert torch.equal(module(*args), reference), f"{name} output differs from the original"

    samples: dict[str, list[float]] = {"original eager": [], **{k: [] for k in contenders}}
    for _ in range(repeats):
        samples["original eager"].append(timed(original, *args))
        for name, module in contenders.items():
            samples[name].append(timed(module, *args))
    base = statistics.median(samples["original eager"])
    print(
        f"[forward] H 1024, I 512, 64 experts, top-{top_k}, {tokens} tokens, bf16, {torch.get_num_threads()} threads, {repeats} alternating runs"
    )
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"  {name:26} median {med * 1e3:8.1f} ms   ratio {med / base:.3f}   (target <= 1.00)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-modelopt", action="store_true")
    args = parser.parse_args()
    bench_unfuse(args.repeats)
    bench_forward(args.repeats, not args.skip_modelopt)


if __name__ == "__main__":
    main()
