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
    add_eval_arguments(parser, required=True)
    parser.add_argument("path", type=Path, metavar="CKPT", help="checkpoint folder (config.json, *.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """The evaluation's arguments (``eval``, and ``verify --against``)."""
    from ...base.options import DEFAULT_EVAL_SIZE, DEFAULT_SEQ_LEN

    parser.add_argument(
        "--against",
        type=Path,
        metavar="MODEL",
        required=required,
        help="the original model's local folder (its tokenizer too)",
    )
    parser.add_argument(
        "--calib-dataset",
        metavar="NAME_OR_PATH",
        help="text to evaluate on (as quantize's --calib-dataset; pass text calibration did not use; default: a built-in held-out text)",
    )
    parser.add_argument(
        "--eval-size", type=int, default=DEFAULT_EVAL_SIZE, metavar="N", help=f"samples (default {DEFAULT_EVAL_SIZE})"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="T",
        help=f"tokens per sample (default {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument("--max-kl", type=float, metavar="X", help="fail when KL(original || quantized) exceeds X")


def evaluate_args(args: argparse.Namespace, progress: bool) -> object:
    """Run the evaluation the arguments describe."""
    from ...hub.loading import load_tokenizer
    from ...quant.evaluate import evaluate, samples_for
    from ...quant.export import quiet

    if not progress:  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.against)
    samples, source = samples_for(tokenizer, args.calib_dataset, args.eval_size, args.seq_len)
    with quiet():
        return evaluate(args.path, args.against, samples, held_out=source, progress=progress)


def run(args: argparse.Namespace) -> int:
    from ...quant.evaluate import numeric_check

    ev = evaluate_args(args, not args.no_progress)
    check = numeric_check(ev, args.max_kl)
    if args.json:
        print(json.dumps(ev.to_dict() | {"ok": check.ok}, indent=2))
    else:
        print(f"{args.path} against {args.against}")
        print("\n".join(f"  {line}" for line in ev.lines()))
        print(f"  {'ok' if check.ok else 'FAILED'}: {check.line()}")
    return 0 if check.ok else 1
