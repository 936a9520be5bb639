"""Export every spec with a whole tiny model to FP8 and NVFP4 for the engine loader tests (run in the
main environment: moe_unfuse needs its own torch and modelopt; the engines bring theirs).

``python tests_vllm/make_exports.py DIR`` writes ``DIR/ARCH/QFORMAT[-engine-E]`` checkpoints, as
``moe-unfuse quantize MODEL --engine vllm`` writes them from the tiny model saved as the hub has it
(``save_tiny_model``, kept as ``DIR/ARCH/source``: the unquantized checkpoint the loader test tries when an
export fails), and ``DIR/manifest.json``: one entry per export with what ``verify --engine vllm`` said of
it, and every spec without an export with the reason. A family whose spec says vLLM cannot serve its
experts or some modules quantized, or its head unquantized (``export.engines``), is also exported for
``--engine hf`` (as the other engines get it), which vLLM's loader must fail and ``verify --engine vllm``
must refuse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

QFORMATS = ("fp8", "nvfp4")
QUICK = ["--calib-size", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--force-routing"]


def plan(archs: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(archs to export, {arch: why not} for the specs without an export)."""
    import moe_unfuse

    todo, skipped = [], {}
    for arch, spec in sorted(moe_unfuse.list_specs().items()):
        if archs and arch not in archs:
            continue
        if not (spec.golden or {}).get("model"):
            reason = (spec.golden or {}).get("no_model")
            skipped[arch] = f"no whole tiny model: {reason}" if reason else "no whole tiny model in the spec"
        elif spec.resolve_class() is None:
            skipped[arch] = "its class is not in the installed transformers"
        else:
            todo.append(arch)
    return todo, skipped


def export_arch(root: Path, arch: str) -> list[dict]:
    """The exports of one spec's tiny model (one worker process runs several of these in turn)."""
    import moe_unfuse
    from moe_unfuse.cli.main import main
    from moe_unfuse.hub.tiny import save_tiny_model

    spec = moe_unfuse.get_spec(arch)
    source = root / arch / "source"  # kept: the loader test loads it when an export fails (engine limit or ours)
    save_tiny_model(spec, source)
    # what the spec's export.engines.vllm leaves BF16 for vLLM (the experts, module globs), and quantizes
    kept = (["experts"] if spec.experts_unquantized_for("vllm") else []) + list(spec.modules_unquantized_for("vllm")[0])
    heads = list(spec.modules_quantized_for("vllm")[0])
    engines = ["vllm"] + (["hf"] if kept or heads else [])
    entries = []
    for qformat in QFORMATS:
        for engine in engines:
            name = qformat if engine == "vllm" else f"{qformat}-engine-{engine}"
            out = root / arch / name
            args = ["quantize", str(source), "--device-map", "cpu", "--qformat", qformat, "--out", str(out)]
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = main([*args, "--engine", engine, *QUICK])
            invalid = out.with_name(out.name + ".invalid")
            if rc == 1 and invalid.is_dir():  # written, but verify refused it (vLLM's recorded failure): load it anyway
                invalid.rename(out)
            elif rc != 0:
                raise SystemExit(f"{arch} {qformat} --engine {engine}: moe-unfuse quantize exited {rc}")
            report = moe_unfuse.verify_checkpoint(out, engine="vllm")
            entries.append(
                {
                    "arch": arch,
                    "qformat": qformat,
                    "engine": engine,
                    "path": f"{arch}/{name}",
                    "source": f"{arch}/source",
                    "kept_unquantized": kept if engine == "vllm" else [],
                    "quantized_for_engine": heads if engine == "vllm" else [],
                    "verify_vllm": report.ok,
                    "verify_vllm_failed": [c.name for c in report.checks if not c.ok],
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(f"{arch:24} {name:18} verify --engine vllm: {'ok' if report.ok else 'FAILS'}", flush=True)
    return entries


def _export_many(root: Path, archs: list[str]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return [e for arch in archs for e in export_arch(root, arch)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (emptied first)")
    parser.add_argument("--arch", help="comma-separated archs (default: every spec)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    todo, skipped = plan(args.arch.split(",") if args.arch else None)
    chunks = [todo[i :: args.jobs] for i in range(args.jobs)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [e for part in pool.map(_export_many, [args.out] * len(chunks), chunks) for e in part]
    manifest = {"entries": sorted(done, key=lambda e: e["path"]), "skipped": skipped}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest['entries'])} exports, {len(manifest['skipped'])} specs without one", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
