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


#: Exit status after Ctrl-C, as a shell reports a process killed by SIGINT (128 + 2).
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    command = "moe-unfuse"
    try:
        args = build_parser().parse_args(argv)
        command = f"moe-unfuse {args.command}"
        return int(args._run(args) or 0)
    except MoeUnfuseError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moe-unfuse list --json | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _interrupted(command)


def _interrupted(command: str) -> int:
    """One line for Ctrl-C, then no more: a second Ctrl-C while exiting is ignored, and stderr is
    closed to late writers (progress bars, threads) so nothing follows the line."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more to say there
        pass
    print(f"{command}: interrupted", file=sys.stderr, flush=True)
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    except (OSError, ValueError):  # stderr is not a file descriptor (captured): nothing to close
        pass
    return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
