"""The prepared GPU check: whole model and layer by layer on one device, bytes compared, per-layer time,
peak GPU and host memory, and one exported NVFP4 expert checked against its weights.

    python benchmarks/gpu_check.py [--device cuda] [--dir DIR] [--layers 4] [--small]

Writes its own inputs under ``--dir``: the built-in tiny Gemma 4 saved as a folder, and a ``--layers``
checkpoint with Gemma-4-26B-A4B's text dimensions (``moe_unfuse.hub.tiny.GEMMA4_26B_A4B_TEXT``, a
512-token vocabulary: 1.65 GB per layer; ``--small``: the tiny model only, CI-sized). Each is quantized
to NVFP4 through the public API (``moe_unfuse.quant.quantize.run_quantize`` with ``QuantizeOptions.device``),
whole and layer by layer, and the two checkpoints are compared tensor by tensor. Then one exported expert (``gate_proj`` of expert 0 in
layer 0) is dequantized with modelopt's ``NVFP4QTensor`` and compared with the source weight; where
modelopt's real NVFP4 GEMM can run (``modelopt.torch.quantization.backends.nvfp4_gemm``: compute
capability 10.0 or newer and TensorRT-LLM's kernels) the packed expert also goes through it against
the dequantized weight; elsewhere that step is reported as skipped, with the reason.
``--device cpu --small`` is the CI-sized form (``tests/test_gpu_check.py``). Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import same_tensors  # noqa: E402 - the sibling benchmark's tensor-by-tensor comparison

from moe_unfuse.hub.tiny import GEMMA4_26B_A4B_TEXT, byte_tokenizer, tiny_gemma4, write_gemma4_checkpoint  # noqa: E402
from moe_unfuse.quant.quantize import QuantizeOptions, run_quantize  # noqa: E402

#: NVFP4's block size (16 weights share one FP8 scale).
BLOCK = 16


def host_peak() -> int:
    """This process's peak resident memory so far (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024


def quantize(model: Path, out: Path, device: str, layerwise: bool, calib: int, seq: int) -> dict[str, Any]:
    """One ``run_quantize`` of ``model`` on ``device``: its wall time, peaks and verification."""
    opts = QuantizeOptions(
        model=str(model),
        qformat="nvfp4",
        out=out,
        calib_size=calib,
        seq_len=seq,
        batch_size=4,
        device=device,
        layerwise=layerwise,
        overwrite=True,
        progress=False,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = run_quantize(opts)
    wall = time.perf_counter() - t0
    return {
        "mode": "layer by layer" if layerwise else "whole",
        "wall_s": round(wall, 1),
        "layers": report.layers,
        "s_per_layer": round(wall / report.layers, 2) if report.layers else None,
        "verify_ok": report.ok,
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None,
        "host_peak_gb_so_far": round(host_peak() / 1e9, 2),
        "device": report.device,
    }


def expert_check(checkpoint: Path, source: Path, device: str) -> dict[str, Any]:
    """Dequantize one exported NVFP4 expert with modelopt and compare it with the source weight; run it
    through modelopt's real NVFP4 GEMM where that can run."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from safetensors import safe_open

    def tensors(folder: Path, keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in keys if k in fh.keys()})
        return out

    name = "model.layers.0.experts.0.gate_proj"
    got = tensors(checkpoint, [f"{name}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")])
    packed, scale = got[f"{name}.weight"].to(device), got[f"{name}.weight_scale"].to(device)
    scale_2, input_scale = got[f"{name}.weight_scale_2"].to(device), got[f"{name}.input_scale"].to(device)
    rows, cols = packed.shape[0], packed.shape[1] * 2
    fused = tensors(source, ["model.layers.0.experts.gate_up_proj"])["model.layers.0.experts.gate_up_proj"]
    source_w = fused[0, :rows].to(device=device, dtype=torch.float32)  # expert 0's gate rows: [E, 2I, H]
    deq = NVFP4QTensor(torch.Size((rows, cols)), torch.bfloat16, packed).dequantize(
        dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK}
    )
    rel = ((deq - source_w).norm() / source_w.norm()).item()
    result: dict[str, Any] = {
        "expert": name,
        "shape": [rows, cols],
        "dequantized_vs_source_rel_error": round(rel, 4),
        # NVFP4 (E2M1 values, one FP8 scale per 16) of Gaussian weights: about 0.08-0.10
        "dequantized_ok": rel < 0.15,
    }
    from modelopt.torch.quantization.backends.utils import fp4_compatible

    try:
        import tensorrt_llm._torch  # noqa: F401
    except ImportError:
        trtllm = False
    else:
        trtllm = True
    if not (device.startswith("cuda") and fp4_compatible() and trtllm):
        cc = ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None
        result["nvfp4_gemm"] = (
            "skipped: modelopt's real NVFP4 GEMM (modelopt.torch.quantization.backends.nvfp4_gemm) needs a CUDA "
            f"device of compute capability >= 10.0 (this one: {cc or 'no CUDA'}) and TensorRT-LLM's kernels "
            f"(tensorrt_llm {'importable' if trtllm else 'not installed'})"
        )
        return result
    from types import SimpleNamespace

    from modelopt.torch.quantization.backends.nvfp4_gemm import nvfp4_gemm
    from modelopt.torch.quantization.qtensor import QTensorWrapper

    x = torch.randn(64, cols, device=device, dtype=torch.bfloat16)
    module = SimpleNamespace(
        input_quantizer=SimpleNamespace(amax=input_scale.float() * 448.0 * 6.0),
        weight=QTensorWrapper(NVFP4QTensor(torch.Size((rows, cols)), torch.bfloat16, packed)),
        weight_quantizer=SimpleNamespace(_scale=scale, _double_scale=scale_2),
    )
    try:
        y = nvfp4_gemm(module, x).float()
    except Exception as exc:  # noqa: BLE001 - reported: the check's point is to show what modelopt does
        result["nvfp4_gemm"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        result["nvfp4_gemm_ok"] = False
        return result
    ref = x.float() @ deq.T
    gemm_rel = ((y - ref).norm() / ref.norm()).item()
    result["nvfp4_gemm_vs_dequantized_rel_error"] = round(gemm_rel, 4)
    result["nvfp4_gemm_ok"] = gemm_rel < 0.15  # the GEMM also quantizes the input to NVFP4
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe_unfuse_gpu_check"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="the tiny model's dimensions (CI-sized)")
    parser.add_argument("--calib-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    tiny = args.dir / "tiny"
    if not (tiny / "config.json").is_file():
        tiny_gemma4().save_pretrained(tiny)
        byte_tokenizer().save_pretrained(tiny)
    big = tiny if args.small else args.dir / "gemma4-26b-sized"
    if not (big / "config.json").is_file():
        dims = {**GEMMA4_26B_A4B_TEXT, "vocab_size": 512, "vocab_size_per_layer_input": 512}
        t0 = time.perf_counter()
        size = write_gemma4_checkpoint(big, args.layers, **dims)
        results["wrote"] = f"{big.name}: {args.layers} layers, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s"
    ok = True
    for label, model in {"tiny": tiny, big.name: big}.items():
        runs = [
            quantize(
                model, args.dir / f"{label}-{mode}", args.device, mode == "layerwise", args.calib_size, args.seq_len
            )
            for mode in ("whole", "layerwise")
        ]
        same, n = same_tensors(args.dir / f"{label}-whole", args.dir / f"{label}-layerwise")
        results[label] = {"runs": runs, "identical_tensors": same, "tensors": n}
        ok = ok and same and all(r["verify_ok"] for r in runs)
        print(json.dumps({label: results[label]}), flush=True)
    results["expert"] = expert_check(args.dir / f"{big.name}-whole", big, args.device)
    ok = ok and results["expert"]["dequantized_ok"] and results["expert"].get("nvfp4_gemm_ok", True)
    results["ok"] = ok
    print(json.dumps({"expert": results["expert"], "ok": ok}), flush=True)
    (args.dir / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
