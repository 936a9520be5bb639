"""Calibration and fake-quant forward speed, each over an eager forward timed right beside it.

    .venv/bin/python benchmarks/bench_speed.py [--repeats 5] [--qformats fp8,nvfp4] [--skip-torchrun]

One experts module (Gemma4TextExperts, fp32, hidden 1024, moe_intermediate 512, 64 experts, top-8,
1024 tokens), quantized two ways, each in its own subprocess (registrations are process-wide):

* ``moe_unfuse``: ``moe_unfuse.register("gemma4")`` + ``mtq.quantize`` (per-expert QuantLinears);
* ``modelopt``: ``mtq.quantize`` alone, which wraps the class with modelopt's own fused-experts
  wrapper (``_QuantFusedExperts``, found by ``register_fused_experts_on_the_fly``).

Per format and path: (a) ``mtq.quantize`` with one calibration pass, conversion included, (a8) the
same with eight calibration passes over eight eager forwards (the conversion's fixed cost, about one
quantizer config match per pattern per quantizer, spread over a calibration set as real runs have), (b) the
calibration forward alone, (c) the fake-quant forward after calibration; every sample is divided by
nothing but compared through medians with eager forwards run alternately in the same loop, so
machine noise hits both sides alike. ``MOE_UNFUSE_FAST=0`` in the environment measures moe_unfuse
without its weight cache. (d) wall time of ``torchrun --nproc-per-node 2`` over ``1`` running
``moe_unfuse quantize`` on the built-in tiny model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {"quantize+calib": 1.2, "calib forward": 1.2, "fake-quant fwd": 1.3}
#: Calibration passes of the amortized measure (a8): reported beside the targets, not against one.
PASSES = 8
SHAPE = dict(hidden=1024, inter=512, experts=64, top_k=8, tokens=1024)


def _setup():
    import torch
    from torch import nn
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    torch.manual_seed(0)
    config = Gemma4TextConfig(
        hidden_size=SHAPE["hidden"], moe_intermediate_size=SHAPE["inter"], num_experts=SHAPE["experts"]
    )
    config._experts_implementation = "eager"
    experts = Gemma4TextExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    hidden = torch.randn(SHAPE["tokens"], SHAPE["hidden"])
    weights, index = torch.randn(SHAPE["tokens"], SHAPE["experts"]).topk(SHAPE["top_k"], dim=-1)
    args = (hidden, index, torch.softmax(weights, -1))

    class Harness(nn.Module):
        def __init__(self, experts: nn.Module):
            super().__init__()
            self.experts = experts

        def forward(self, *a):
            return self.experts(*a)

    return experts, args, Harness


def _timed(fn) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def worker(path: str, qformat: str, repeats: int, threads: int) -> dict:
    """Runs in its own process: medians of eager and of (a), (b), (c) for one path and format."""
    import modelopt.torch.quantization as mtq
    import torch

    torch.set_num_threads(threads)

    experts, args, Harness = _setup()
    if path == "moe_unfuse":
        import moe_unfuse

        moe_unfuse.register("gemma4")
    cfg = {"fp8": mtq.FP8_DEFAULT_CFG, "nvfp4": mtq.NVFP4_DEFAULT_CFG}[qformat]
    eager = lambda: experts(*args)  # noqa: E731
    for _ in range(2):
        _timed(eager)
    samples: dict[str, list[float]] = {"eager": [], "eager x8": [], "quantize+calib x8": [], **{k: [] for k in TARGETS}}
    model = None
    for _ in range(repeats):
        for passes in (PASSES, 1):
            model = Harness(copy.deepcopy(experts))
            calib: list[float] = []

            def loop(m, passes=passes):
                for _ in range(passes):
                    t0 = time.perf_counter()
                    m(*args)
                    calib.append(time.perf_counter() - t0)

            if passes == 1:
                samples["eager"].append(_timed(eager))
                samples["quantize+calib"].append(
                    _timed(lambda: mtq.quantize(model, copy.deepcopy(cfg), forward_loop=loop))
                )
                samples["calib forward"] += calib
            else:
                samples["eager x8"].append(_timed(lambda: [eager() for _ in range(passes)]))
                samples["quantize+calib x8"].append(
                    _timed(lambda: mtq.quantize(model, copy.deepcopy(cfg), forward_loop=loop))
                )
    wrapper = type(model.experts).__mro__[1].__name__
    base = statistics.median(samples["eager"])
    result: dict[str, float | str] = {
        k: statistics.median(samples[k]) / base for k in ("quantize+calib", "calib forward")
    }
    result["quantize+calib x8"] = statistics.median(samples["quantize+calib x8"]) / statistics.median(
        samples["eager x8"]
    )
    fq = lambda: model(*args)  # noqa: E731
    try:
        _timed(fq)
    except Exception as exc:  # modelopt's NVFP4 fake quant needs CUDA
        result["fake-quant fwd"] = f"n/a: {type(exc).__name__}: {exc}"
        return {"eager_ms": base * 1e3, "ratios": result, "wrapper": wrapper}
    fq_eager: list[float] = []
    for _ in range(repeats):
        fq_eager.append(_timed(eager))
        samples["fake-quant fwd"].append(_timed(fq))
    # the fake-quant forward has its own eager samples (taken after calibration, alternately)
    result["fake-quant fwd"] = statistics.median(samples["fake-quant fwd"]) / statistics.median(fq_eager)
    return {"eager_ms": base * 1e3, "ratios": result, "wrapper": wrapper}


def run_worker(path: str, qformat: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--qformats", qformat, "--repeats", str(repeats)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def bench_torchrun(repeats: int) -> None:
    """Wall time of the CLI on the built-in tiny model under torchrun with 1 and 2 processes."""
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for n in (1, 2):
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    str(n),
                    "-m",
                    "moe_unfuse",
                    "quantize",
                    "--qformat",
                    "fp8",
                    "--out",
                    os.path.join(tmp, f"out{n}"),
                    "--overwrite",
                    "--no-progress",
                ]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                times[n].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    print(f"[torchrun] nproc {n} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                    return
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"[torchrun] moe_unfuse quantize --qformat fp8 on the tiny default, {repeats} alternating runs")
    print(f"  nproc 1 {one:6.1f} s   nproc 2 {two:6.1f} s   ratio 2/1 {two / one:.2f}   ({os.cpu_count()} CPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--qformats", default="fp8,nvfp4")
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--torchrun-repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: OpenMP spinning on a shared CPU skews ratios)",
    )
    parser.add_argument("--worker", choices=("moe_unfuse", "modelopt"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.qformats, args.repeats, args.threads)))
        return
    fast = os.environ.get("MOE_UNFUSE_FAST", "1")
    print(
        f"[speed] Gemma4TextExperts fp32, H {SHAPE['hidden']}, I {SHAPE['inter']}, {SHAPE['experts']} experts, "
        f"top-{SHAPE['top_k']}, {SHAPE['tokens']} tokens; {args.repeats} alternating runs; "
        f"{args.threads} thread(s); MOE_UNFUSE_FAST={fast}"
    )
    for qformat in args.qformats.split(","):
        for path in ("moe_unfuse", "modelopt"):
            r = run_worker(path, qformat, args.repeats, args.threads)
            if "error" in r:
                print(f"  {qformat:6} {path:10} skipped: {r['error']}")
                continue
            for name, target in [*TARGETS.items(), ("quantize+calib x8", None)]:
                ratio = r["ratios"][name]
                shown = f"{ratio:5.2f}" if isinstance(ratio, float) else ratio
                goal = f"target <= {target:.1f}" if target else f"({PASSES} passes)"
                print(
                    f"  {qformat:6} {path:10} {name:17} ratio {shown}   {goal:14}"
                    f"   (eager {r['eager_ms']:.0f} ms, {r['wrapper']})"
                )
    if not args.skip_torchrun:
        bench_torchrun(args.torchrun_repeats)


if __name__ == "__main__":
    main()
