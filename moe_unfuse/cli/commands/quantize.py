"""Quantize a fused-MoE model with modelopt, export it for a serving engine, and verify the export.

Data-parallel calibration: torchrun --nproc-per-node N -m moe_unfuse quantize ... (each rank
calibrates on every N-th batch; amax and token counts are reduced; rank 0 writes the checkpoint).

With no MODEL, a built-in tiny Gemma 4 (random seeded weights, byte-level tokenizer, built-in
calibration text) runs offline in about a minute on a CPU. MODEL is a local folder (config.json,
safetensors, tokenizer); nothing is downloaded.

Steps: match the model's experts modules to specs (every fused expert parameter must be covered,
else it fails naming them), register them with modelopt, calibrate (tokens counted per expert;
--force-routing calibrates experts the text never reached), set input scales, export with
modelopt's HF export under the hub checkpoint's names (fused where the spec's export layout says),
verify the export contract and --engine's loader rules, swap the checkpoint into OUT atomically, report.
--layerwise (the default when the whole model would not fit in memory) does the same one decoder
layer at a time, reading each layer's weights from disk onto --device when it runs; killed, the same
command resumes after the last completed layer.
Exit status: 0 ok, 1 the export failed verification (kept at OUT.invalid), 2 bad input or an export
error (one line; OUT.invalid/moe_unfuse.json says why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...base.options import (
        ALGORITHMS,
        DEFAULT_BATCH_SIZE,
        DEFAULT_CALIB_SIZE,
        DEFAULT_CHUNK_TOKENS,
        DEFAULT_EVAL_SIZE,
        INPUT_SCALE_POLICIES,
        QFORMATS,
        TRUST_MODULE_HELP,
        default_eval_size,
    )
    from ...plugins.manager import registry
    from ..evaluation import add_seq_len

    parser.add_argument(
        "model", nargs="?", metavar="MODEL", help="local model folder (default: the built-in tiny Gemma 4)"
    )
    parser.add_argument(
        "--qformat", required=True, choices=list(QFORMATS), help="quantization format (none: unfuse and re-export only)"
    )
    parser.add_argument(
        "--algorithm",
        default="max",
        choices=ALGORITHMS,
        help="modelopt calibration algorithm: max (default) or mse (each expert weight's amax searched for the "
        "least squared error; fp8 only: modelopt's NVFP4 search needs a GPU)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument(
        "--engine",
        default="vllm",
        choices=list(registry().engines),
        help="serving engine whose loader rules the export is verified against (names are always the hub's); default vllm",
    )
    parser.add_argument(
        "--calib-size",
        type=int,
        default=DEFAULT_CALIB_SIZE,
        metavar="N",
        help=f"calibration samples (default {DEFAULT_CALIB_SIZE}; fewer if the text runs out)",
    )
    parser.add_argument(
        "--calib-dataset",
        "--calib-file",
        metavar="NAME_OR_PATH",
        help="calibration data, streamed: a .jsonl/.json/.txt file, a save_to_disk folder or a Hugging Face dataset "
        "name (those two need the datasets package); records with text or chat messages (default: built-in text)",
    )
    add_seq_len(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"samples per forward (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--device-map",
        default="auto",
        metavar="MAP",
        help="accelerate device_map for MODEL: auto, cpu, cuda, balanced, sequential, none (default auto)",
    )
    parser.add_argument(
        "--device",
        metavar="DEV",
        help="where to compute: cpu, cuda, cuda:N (default: the first GPU when there is one, else the CPU; under "
        "torchrun each rank's LOCAL_RANK GPU). Layer by layer reads each layer's weights from disk onto it; "
        "with --device-map auto, the whole model is placed there",
    )
    parser.add_argument(
        "--layerwise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize MODEL one decoder layer at a time, every weight read from disk when its layer runs: "
        "peak memory about one layer, the same checkpoint (default: only when the whole model would not "
        "fit in the memory left to this process). A killed run started again with the same command resumes after "
        "its last completed layer (state in OUT.resume)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dtype to load and calibrate MODEL in (default: the checkpoint's); the export writes every "
        "unquantized tensor in MODEL's own dtype and keeps MODEL's config.json",
    )
    parser.add_argument(
        "--input-scale",
        default="shared",
        choices=list(INPUT_SCALE_POLICIES),
        help="expert input scales: shared = one per layer and input, max over experts (what fused-MoE kernels use; default); per-expert = each its own",
    )
    parser.add_argument(
        "--force-routing",
        action="store_true",
        help="after calibration, run experts that got no token on their layer's actual inputs (outputs discarded)",
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        metavar="T",
        help=f"tokens per forced-routing chunk (default {DEFAULT_CHUNK_TOKENS})",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep modules matching this name glob unquantized (repeatable), e.g. '*layers.0.experts*'",
    )
    parser.add_argument(
        "--fuse-unquantized",
        "--refuse-unquantized",
        action="store_true",
        help="write experts modules left unquantized back as the model's fused tensors (from_pretrained-loadable)",
    )
    parser.add_argument(
        "--allow-uncovered",
        action="store_true",
        help="proceed when fused expert parameters have no spec (they stay unquantized); default: fail naming them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--multimodal",
        action="store_true",
        help="built-in model only: Gemma4ForConditionalGeneration with vision and audio towers",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=default_eval_size(),
        metavar="N",
        help=f"held-out samples (--seq-len tokens each, not used by calibration) on which the written checkpoint is measured against the original (default {DEFAULT_EVAL_SIZE}; 0: no evaluation)",
    )
    parser.add_argument(
        "--max-kl",
        type=float,
        metavar="X",
        help="fail (exit 1, checkpoint kept at OUT.invalid) when KL(original || quantized) per token exceeds X",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--report", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--trust-module", action="append", default=[], metavar="MODULE", help=TRUST_MODULE_HELP, dest="trust_modules"
    )


def run(args: argparse.Namespace) -> int:
    from ...base.errors import MoeUnfuseError
    from ...quant.quantize import QuantizeOptions, run_quantize

    if args.model is not None and args.multimodal:
        raise MoeUnfuseError("--multimodal applies to the built-in model only; fix: drop it or drop MODEL")
    opts = QuantizeOptions(
        model=args.model,
        qformat=args.qformat,
        out=args.out,
        calib_size=args.calib_size,
        calib_dataset=args.calib_dataset,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device_map=args.device_map,
        dtype=args.dtype,
        engine=args.engine,
        input_scale=args.input_scale,
        force_routing=args.force_routing,
        chunk_tokens=args.chunk_tokens,
        allow_uncovered=args.allow_uncovered,
        fuse_unquantized=args.fuse_unquantized,
        exclude=tuple(args.exclude),
        overwrite=args.overwrite,
        multimodal=args.multimodal,
        progress=not args.no_progress,
        layerwise=args.layerwise,
        trust_modules=tuple(args.trust_modules),
        algorithm=args.algorithm,
        device=args.device,
        eval_size=args.eval_size,
        max_kl=args.max_kl,
    )
    report = run_quantize(opts)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    as_json = json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    print(as_json if args.json else report, end="" if args.json else "\n")
    if args.report:
        args.report.write_text(as_json)
    return 0 if report.ok else 1
