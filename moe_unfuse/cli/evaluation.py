"""The quality evaluation's command-line arguments and their run, shared by ``eval`` and ``verify --against``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_eval_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """The evaluation's arguments (``eval``, and ``verify --against``)."""
    from ..base.options import DEFAULT_EVAL_SIZE

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
    add_seq_len(parser)
    parser.add_argument("--max-kl", type=float, metavar="X", help="fail when KL(original || quantized) exceeds X")


def add_seq_len(parser: argparse.ArgumentParser) -> None:
    """``--seq-len``, as ``quantize``, ``eval`` and ``verify --against`` take it."""
    from ..base.options import DEFAULT_SEQ_LEN

    parser.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="T",
        help=f"tokens per sample (default {DEFAULT_SEQ_LEN})",
    )


def evaluate_args(args: argparse.Namespace, progress: bool) -> object:
    """Run the evaluation the arguments describe."""
    from ..hub.loading import load_tokenizer
    from ..quant.evaluate import evaluate, samples_for
    from ..quant.export_context import quiet

    if not progress:  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.against)
    samples, source = samples_for(tokenizer, args.calib_dataset, args.eval_size, args.seq_len)
    with quiet():
        return evaluate(args.path, args.against, samples, held_out=source, progress=progress)
