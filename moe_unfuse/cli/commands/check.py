"""Validate a spec file and run its golden checks, so a new model is proven without writing code.

Loads SPEC.yaml (a bad field is one line naming file, field and fix), then runs every golden check
(moe_unfuse.tools.golden.run_golden: bit-exact against the eager forward in fp32 and bf16 with top-k 1, 2
and 3 whatever golden.top_k says, called positionally and by the forward's own argument names; close
to grouped_mm/batched_mm, refuse bit-exact, modelopt quantizers-off exact and FP8 calibrating every
expert, whole-model logits) and prints each. Exit status 0 when all pass, 1 when one fails, 2 for a
spec error (a layout the class does not have is one, not a crash).

  moe-unfuse check specs/mixtral.yaml
  moe-unfuse check my_model.yaml --trust-module mymodels   # a class in your own module mymodels
"""

from __future__ import annotations

import argparse

from ...base.errors import first_line
from ...base.options import TRUST_MODULE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", metavar="SPEC.yaml", help="spec file to check (extends resolves next to it and in the built-in specs)"
    )
    parser.add_argument("--no-modelopt", action="store_true", help="skip the modelopt checks (faster)")
    parser.add_argument(
        "--trust-module", action="append", default=[], metavar="MODULE", help=TRUST_MODULE_HELP, dest="trust_modules"
    )


def run(args: argparse.Namespace) -> int:
    from ...spec.imports import trusted_modules

    with trusted_modules(args.trust_modules):
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    import time

    from ...base.errors import MoeUnfuseError, SpecError
    from ...core import drift
    from ...tools.golden import run_golden
    from ..spec_lookup import resolve_spec

    spec = resolve_spec(args.spec)
    drift.check(spec)  # a transformers not in verified_on: what changed in the class, in one line
    if spec.resolve_class() is None:
        raise SpecError(
            spec.source,
            "target.class",
            f"{spec.target_class} is not in the installed transformers",
            "install a transformers version listed in target.verified_on",
        )
    print(f"spec ok: {spec.arch} -> {spec.target_class} ({spec.source})")
    if not spec.golden:
        raise SpecError(
            spec.source,
            "golden",
            "missing, so nothing can be checked",
            "add golden.config and golden.config_kwargs (a tiny config of the model)",
        )
    start = time.perf_counter()
    try:
        results = run_golden(spec, modelopt=not args.no_modelopt)
    except MoeUnfuseError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, reported in one line
        print(f"FAIL golden checks crashed: {first_line(exc, with_type=True)}")
        return 1
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'}  {r.name:24} {r.detail}")
    failed = [r.name for r in results if not r.ok]
    took = time.perf_counter() - start
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed ({', '.join(failed)}) in {took:.1f} s")
        return 1
    print(f"all {len(results)} checks passed in {took:.1f} s")
    return 0
