"""Audit a model from its config alone (no weights, no download): experts, coverage, quantization plan, sizes.

MODEL is a local model folder or its config.json. The model is built on the meta device, so a
25B-parameter config audits in seconds. Reports every fused expert parameter and the spec covering
it, parameters by category, what QFORMAT (a modelopt preset) quantizes and excludes once the
experts are unfused, and the estimated checkpoint size for bf16, fp8, nvfp4 and
nvfp4_experts_only. Exit status 1 when a fused expert parameter has no spec (a quantizer would
skip it silently) or a spec does not fit its module.

  moe-unfuse audit path/to/gemma-4-26B-A4B/config.json --qformat nvfp4
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="local model folder or config.json")
    parser.add_argument(
        "--qformat",
        default="nvfp4",
        help="format whose quantize/exclude plan to show: bf16 or a modelopt preset (default: nvfp4)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ...tools.audit import audit

    report = audit(args.model, args.qformat)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1
