"""``moe-unfuse``: one subcommand per module in ``moe_unfuse.commands``.

Each command module has a docstring (its help), ``add_arguments(parser)`` and ``run(args) -> int``,
and keeps heavy imports (torch, transformers, modelopt) inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import MoeUnfuseError

COMMANDS = ("quantize", "verify", "list", "show", "check", "audit", "infer", "coverage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-unfuse", description="Quantize fused Mixture-of-Experts models by unfusing their experts, from declarative specs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"moe_unfuse.commands.{name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MoeUnfuseError as exc:
        print(f"moe-unfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moe-unfuse list --json | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
