"""Measure a modelopt-format FP8/NVFP4 checkpoint (whoever made it) against the model it was quantized
from: every experts module, linear and embedding on the same inputs (relative error, SNR), and the
logits (KL(original || quantized), top-1 agreement, both perplexities); see moe_unfuse/quant/evaluate.py.

Exit status: 0 every module within its format's limit (and KL within --max-kl), 1 a module fails
(named), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation import add_eval_arguments

    add_eval_arguments(parser, required=True)
    parser.add_argument("path", type=Path, metavar="CKPT", help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ...quant.eval_report import numeric_check
    from ..evaluation import evaluate_args

    ev = evaluate_args(args, not args.no_progress)
    check = numeric_check(ev, args.max_kl)
    if args.json:
        print(json.dumps(ev.to_dict() | {"ok": check.ok}, indent=2))
    else:
        print(f"{args.path} against {args.against}")
        print("\n".join(f"  {line}" for line in ev.lines()))
        print(f"  {'ok' if check.ok else 'FAILED'}: {check.line()}")
    return 0 if check.ok else 1
