"""Verify an exported checkpoint folder against the export contract (see moe_unfuse/hub/verify.py).

Checks: no fused expert tensor left quantizable; every expert has weight and scales; gate/up share
the NVFP4 global scale; every input_scale is finite and > 0; routers, towers, projectors, lm_head
and unquantized experts are excluded under their final names; the two quantization configs agree;
expert keys are in the engine's naming. With ``--against MODEL``, also the numeric check of
``moe-unfuse eval`` (every module's output against the original's, named when off). Exit status 0 when all hold, 1 otherwise (with the keys).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...base.options import TRUST_MODULE_HELP
    from ...plugins.manager import registry

    parser.add_argument(
        "path", type=Path, metavar="DIR", help="checkpoint folder (config.json, *.safetensors, hf_quant_config.json)"
    )
    parser.add_argument(
        "--engine",
        choices=list(registry().engines),
        help="engine whose loader rules to check (default: the one moe_unfuse.json records, else vllm)",
    )
    parser.add_argument(
        "--arch",
        help="spec(s) whose renames define the naming, comma-separated (default: moe_unfuse.json, else inferred from config.json)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--trust-module", action="append", default=[], metavar="MODULE", help=TRUST_MODULE_HELP, dest="trust_modules"
    )
    from ..evaluation import add_eval_arguments

    add_eval_arguments(parser, required=False)  # --against MODEL: the numeric check too


def run(args: argparse.Namespace) -> int:
    from ...hub.verify import verify_checkpoint
    from ...spec.imports import trusted_modules

    arch = args.arch.split(",") if args.arch else None
    with trusted_modules(args.trust_modules):
        report = verify_checkpoint(args.path, engine=args.engine, arch=arch)
    if args.against is not None:
        from ...quant.eval_report import numeric_check
        from ..evaluation import evaluate_args

        report.checks.append(numeric_check(evaluate_args(args, False), args.max_kl))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1
