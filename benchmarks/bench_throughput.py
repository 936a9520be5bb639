"""Seconds per Gemma-4-26B-A4B-sized decoder layer, layer by layer, split into disk read, compute and
export; projected to whole models.

    .venv/bin/python benchmarks/bench_throughput.py [--layers 1] [--tokens 1024] [--qformat nvfp4] [--dir DIR]

Writes a Gemma 4 checkpoint with google/gemma-4-26B-A4B's text dimensions (hidden 2816, 128 experts
x moe_intermediate 704, top-8; ``moe_unfuse.hub.tiny.GEMMA4_26B_A4B_TEXT``) but a 512-token vocabulary,
so the figures are the decoder layers' own. Then, in this process, through the public API:

- **disk read**: the layer's safetensors bytes read after ``posix_fadvise(DONTNEED)`` evicted them
  from the page cache (the cold read a first pass over a model larger than memory pays);
- **compute**: ``quantize_model(..., layerwise=True)`` on the model offloaded to disk, split into the
  calibration forward loop (token counts, capture, the layer's forward: scales with tokens) and
  the rest (modelopt's conversion of the layer's linears, weight amax, scales: fixed per layer);
- **export**: ``export_checkpoint`` (modelopt's streaming export, post-processing and verify).

The projection for a model with ``L`` decoder layers and a calibration set of ``N`` tokens is

    T = L * (read * b + fixed * b + export * b + calib_per_1k * a * N / 1000)

with ``b`` = the model's bf16 bytes per decoder layer over this layer's, ``a`` = its active
parameters per token per layer over this layer's (calibration computes each token through the
router's top-k experts). Every time measured here is on this machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moe_unfuse.hub.tiny import GEMMA4_26B_A4B_TEXT, write_gemma4_checkpoint


@dataclass(frozen=True)
class Dims:
    """The decoder-layer dimensions a projection needs (MoE layers; dense layers counted as MoE)."""

    name: str
    layers: int
    hidden: int
    experts: int
    top_k: int
    moe_intermediate: int
    shared_intermediate: int  # shared expert or parallel dense MLP (0: none)
    attention: int  # attention parameters per layer

    def layer_params(self) -> int:
        experts = self.experts * 3 * self.hidden * self.moe_intermediate
        return experts + 3 * self.hidden * self.shared_intermediate + self.hidden * self.experts + self.attention

    def active_params(self) -> int:
        return (
            (self.top_k * self.moe_intermediate + self.shared_intermediate) * 3 * self.hidden
            + self.hidden * self.experts
            + self.attention
        )


def _gqa(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return hidden * head_dim * (2 * heads + 2 * kv_heads)


MODELS = [
    # Gemma-4-26B-A4B: 5 sliding (head 256) : 1 full (head 512, k = v); the sliding layers' attention
    # is used (the estimate moe_unfuse.hub.tiny.GEMMA4_26B_A4B_TEXT makes), plus its parallel dense MLP 2112.
    Dims("Gemma-4-26B-A4B", 30, 2816, 128, 8, 704, 2112, _gqa(2816, 16, 8, 256)),
    # Qwen3-235B-A22B (config.json): 94 layers, hidden 4096, 64 q / 4 kv heads of 128, 128 experts x 1536, top-8.
    Dims("Qwen3-235B-A22B", 94, 4096, 128, 8, 1536, 0, _gqa(4096, 64, 4, 128)),
    # DeepSeek-V3 (config.json): 61 layers (3 dense, counted as MoE), hidden 7168, 256 routed experts
    # x 2048 + 1 shared, top-8; MLA: q_lora 1536, kv_lora 512, 128 heads, nope 128 + rope 64, v 128.
    Dims(
        "DeepSeek-V3",
        61,
        7168,
        256,
        8,
        2048,
        2048,
        7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * 7168,
    ),
]


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_layers(files: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every decoder-layer tensor of the checkpoint, cold."""
    evict(files)
    t0, size = time.perf_counter(), 0
    for f in files:
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                if ".layers." in k:
                    t = fh.get_tensor(k)
                    size += t.numel() * t.element_size()
                    del t
    return time.perf_counter() - t0, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens (256 per sample)")
    parser.add_argument("--qformat", default="nvfp4")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe_unfuse_bench_throughput"))
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="compute and export in CPU seconds of this process (all its threads), not wall time: on a shared machine",
    )
    parser.add_argument("--project-tokens", type=int, default=512 * 2048, help="calibration set of the projection")
    args = parser.parse_args()

    import moe_unfuse.quant.quantize as q
    from moe_unfuse.base.memory import map_large_allocations
    from moe_unfuse.hub.loading import load_offloaded, load_tokenizer
    from moe_unfuse.quant.calibration import calibration_batches, read_calibration_texts
    from moe_unfuse.quant.export import export_checkpoint
    from moe_unfuse.quant.layerwise import LAYERWISE_SHARD_SIZE

    model_dir = args.dir / "model"
    if not (model_dir / "config.json").is_file():
        dims = {**GEMMA4_26B_A4B_TEXT, "vocab_size": 512, "vocab_size_per_layer_input": 512}
        write_gemma4_checkpoint(model_dir, args.layers, **dims)
    files = sorted(model_dir.glob("*.safetensors"))
    read_s, layer_bytes = read_layers(files)
    read_s, layer_bytes = read_s / args.layers, layer_bytes / args.layers

    map_large_allocations()
    tokenizer = load_tokenizer(model_dir)
    seq = 256
    batches = calibration_batches(tokenizer, read_calibration_texts(None, tokenizer), args.tokens // seq, seq, 4)
    tokens = sum(b["input_ids"].numel() for b in batches)
    calib = [0.0]
    original = q._calibrate
    clock = time.process_time if args.cpu_time else time.perf_counter

    def timed(*a, **kw):  # noqa: ANN002, ANN003 - the benchmark's stopwatch around the forward loop
        t = clock()
        try:
            return original(*a, **kw)
        finally:
            calib[0] += clock() - t

    q._calibrate = timed
    with tempfile.TemporaryDirectory(dir=args.dir) as offload:
        evict(files)
        model = load_offloaded(model_dir, offload)
        t0 = clock()
        result = q.quantize_model(model, args.qformat, batches, layerwise=True, spill_dir=Path(offload), progress=False)
        compute_s = clock() - t0
        t0 = clock()
        _, report = export_checkpoint(
            model,
            args.dir / "out",
            specs=result.specs,
            qformat=args.qformat,
            progress=False,
            overwrite=True,
            max_shard_size=LAYERWISE_SHARD_SIZE,
        )
        export_s = clock() - t0
    assert report.ok, report.problem_lines()
    n = args.layers
    calib_s, fixed_s = calib[0] / n, (compute_s - calib[0]) / n
    per_1k = calib_s * 1000 / tokens
    export_s /= n
    print(
        f"[throughput] {args.qformat}, {n} layer(s) of Gemma-4-26B-A4B dims ({layer_bytes / 1e9:.2f} GB bf16 each), {tokens} tokens, "
        f"{torch.get_num_threads()} threads, compute and export in {'CPU' if args.cpu_time else 'wall'} seconds"
    )
    print("| per 26B-sized layer | seconds |\n|---|---|")
    print(f"| disk read, cold ({layer_bytes / 1e9:.2f} GB) | {read_s:.1f} ({layer_bytes / 1e9 / read_s:.2f} GB/s) |")
    print(f"| compute: conversion, weight amax, scales (fixed) | {fixed_s:.1f} |")
    print(f"| compute: calibration per 1k tokens | {per_1k:.1f} |")
    print(f"| export (streaming export, post-processing, verify) | {export_s:.1f} |")
    ref = MODELS[0]
    mtok = args.project_tokens
    print(
        f"\n| model | layers | bf16 GB/layer (b) | active params/token/layer (a) | read h | compute h | export h | total h ({mtok} tokens) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        b = m.layer_params() / ref.layer_params()
        a = m.active_params() / ref.active_params()
        read_h = m.layers * read_s * b / 3600
        comp_h = m.layers * (fixed_s * b + per_1k * a * mtok / 1000) / 3600
        exp_h = m.layers * export_s * b / 3600
        print(
            f"| {m.name} | {m.layers} | {2 * m.layer_params() / 1e9:.2f} ({b:.2f}x) | {m.active_params() / 1e6:.0f}M ({a:.2f}x) "
            f"| {read_h:.2f} | {comp_h:.1f} | {exp_h:.2f} | {read_h + comp_h + exp_h:.1f} |"
        )


if __name__ == "__main__":
    main()
