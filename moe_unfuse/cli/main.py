"""``moe-unfuse``: one subcommand per command the plugins register (``register_commands``).

The built-in commands come from the default plugin ``moe_unfuse.default_plugins.commands`` like any
plugin's, each a module in ``moe_unfuse.cli.commands`` with a docstring (its help),
``add_arguments(parser)``, ``run(args) -> int`` and optionally ``ALIASES``, keeping heavy imports
(torch, transformers, modelopt) inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..base.errors import MoeUnfuseError
from ..plugins.manager import registry


def load_command(command: object) -> object:
    """A registered command: the object itself, or the module a dotted name gives."""
    return importlib.import_module(command) if isinstance(command, str) else command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-unfuse",
        description="Quantize fused Mixture-of-Experts models by unfusing their experts, from declarative specs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {name: load_command(command) for name, command in registry().commands.items()}
    taken = dict.fromkeys(commands, "")  # name or alias -> the command it is an alias of ("": a name)
    for name, command in commands.items():
        for alias in getattr(command, "ALIASES", ()):
            if alias in taken:
                holder = f"the command {alias!r}" if not taken[alias] else f"an alias of {taken[alias]!r}"
                raise MoeUnfuseError(
                    f"the command {name!r} has the alias {alias!r}, which is already {holder}; fix: rename one of the plugins' commands"
                )
            taken[alias] = name
    for name, command in commands.items():
        doc = (command.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            aliases=list(getattr(command, "ALIASES", ())),
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(_run=command.run, command=name)
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
