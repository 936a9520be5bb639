"""Peak memory of ``moe-unfuse quantize``: whole model vs layer by layer, measured side by side in one run.

    .venv/bin/python benchmarks/bench_memory.py [--layers 6] [--qformat nvfp4] [--dir DIR]
        [--memory-limit-gb 5] [--skip-whole]

Writes a Gemma 4 checkpoint with google/gemma-4-26B-A4B's text dimensions (hidden 2816, 128 experts
x moe_intermediate 704, top-8, dense MLP 2112, its attention and 262144-token vocabulary; see
``moe_unfuse.hub.tiny.GEMMA4_26B_A4B_TEXT``) and ``--layers`` decoder layers with random weights, one
layer in memory at a time (about 1.6 GB per layer in bf16, 1.5 GB for the embeddings). Then
quantizes it twice, each in its own process: ``--no-layerwise`` (the whole model loaded) and
``--layerwise``; reports each process's peak resident memory (its own ``VmHWM``, reported at exit) over the
checkpoint's bytes (target for layer by layer: <= 0.25), the wall times, and whether the two
checkpoints hold identical tensors. ``--memory-limit-gb`` runs the layer-by-layer process in a
memory cgroup of that size (cgroup v2, or v1's memory controller) to show it completes with less
memory than the checkpoint holds; ``--whole-limit-gb`` guards the machine from the whole-model run
(exit -9 when the kernel kills it at the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

from moe_unfuse.base.memory import run_with_peak_rss
from moe_unfuse.hub.tiny import GEMMA4_26B_A4B_TEXT, write_gemma4_checkpoint


def checkpoint(path: Path, layers: int) -> int:
    stamp = path / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("layers") == layers:
        return json.loads(stamp.read_text())["bytes"]
    t0 = time.perf_counter()
    size = write_gemma4_checkpoint(path, layers, **GEMMA4_26B_A4B_TEXT)
    stamp.write_text(json.dumps({"layers": layers, "bytes": size}))
    print(f"wrote {path}: {layers} layers, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return size


def memory_cgroup(name: str, limit: int) -> Path | None:
    """A fresh memory cgroup of ``limit`` bytes under this process's own (v2, then v1), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_file = Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            base, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        group = base / name
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit))
            if limit_file == "memory.limit_in_bytes" and (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around it
            return group
        except OSError:
            continue
    return None


def run(cmd: list[str], log: Path, cgroup: Path | None = None) -> tuple[int, int, float, str]:
    """(exit code, peak RSS bytes, seconds, stdout) of ``python -m cmd[0] cmd[1:]``, its own peak."""

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    code, peak = run_with_peak_rss(cmd[0], cmd[1:], log, log.with_suffix(".err"), enter)
    return code, peak, time.perf_counter() - t0, log.read_text()


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two checkpoints hold the same tensors bit for bit (read one tensor at a time)."""

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                out.update(dict.fromkeys(fh.keys(), f))
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False, len(ia)
    for key, fa in ia.items():
        with safe_open(fa, "pt") as ha, safe_open(ib[key], "pt") as hb:
            x, y = ha.get_tensor(key), hb.get_tensor(key)
        if (
            x.dtype != y.dtype
            or x.shape != y.shape
            or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        ):
            return False, len(ia)
    return True, len(ia)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--qformat", default="nvfp4")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe_unfuse_bench_memory"))
    parser.add_argument("--calib-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--memory-limit-gb", type=float, default=None, help="cgroup memory limit of the layer-by-layer run"
    )
    parser.add_argument(
        "--whole-limit-gb",
        type=float,
        default=None,
        help="cgroup memory limit of the whole-model run (a guard: it is killed instead of the machine swapping)",
    )
    parser.add_argument(
        "--skip-whole", action="store_true", help="layer by layer only (the whole model needs ~2.2x the checkpoint)"
    )
    args = parser.parse_args()

    model = args.dir / "model"
    size = checkpoint(model, args.layers)
    print(
        f"[memory] {args.qformat}, {args.layers} layers of Gemma-4-26B-A4B dimensions, checkpoint {size / 1e9:.2f} GB",
        flush=True,
    )
    base = [
        "moe_unfuse",
        "quantize",
        str(model),
        "--qformat",
        args.qformat,
        "--overwrite",
        "--calib-size",
        str(args.calib_size),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        "4",
        "--no-progress",
    ]
    results = {}
    for mode in ["layerwise"] if args.skip_whole else ["whole", "layerwise"]:
        flag = "--layerwise" if mode == "layerwise" else "--no-layerwise"
        cgroup = None
        limit = args.memory_limit_gb if mode == "layerwise" else args.whole_limit_gb
        if limit:
            cgroup = memory_cgroup(f"moe_unfuse_bench_{mode}_{os.getpid()}", int(limit * 2**30))
            print(
                f"  {mode}: memory cgroup {cgroup} limit {limit} GiB"
                if cgroup
                else "  (no writable memory cgroup: running without a limit)",
                flush=True,
            )
        code, peak, secs, out = run([*base, flag, "--out", str(args.dir / mode)], args.dir / f"{mode}.log", cgroup)
        if cgroup is not None:
            cgroup.rmdir()
        verify = next((line for line in out.splitlines() if line.startswith("verify")), "(no report)")
        results[mode] = (code, peak)
        print(
            f"  {mode:<9} exit {code}  peak RSS {peak / 1e9:6.2f} GB  peak/checkpoint {peak / size:5.2f}"
            f"{'  target <= 0.25' if mode == 'layerwise' else ''}  wall {secs:6.0f} s  {verify[:60]}",
            flush=True,
        )
    if len(results) == 2 and all(code == 0 for code, _ in results.values()):
        equal, n = same_tensors(args.dir / "whole", args.dir / "layerwise")
        print(
            f"  layer by layer / whole peak {results['layerwise'][1] / results['whole'][1]:.2f}; checkpoints identical: {equal} ({n} tensors)"
        )


if __name__ == "__main__":
    main()
