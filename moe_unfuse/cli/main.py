"""``moe-unfuse``: one subcommand per module in ``moe_unfuse.cli.commands``.

Each command module has a docstring (its help), ``add_arguments(parser)`` and ``run(args) -> int``,
and keeps heavy imports (torch, transformers, modelopt) inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..base.errors import MoeUnfuseError

COMMANDS = ("quantize", "verify", "eval", "list", "show", "check", "audit", "draft", "coverage")
#: Old command names kept for one release: alias -> command.
ALIASES = {"draft": ["infer"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-unfuse",
        description="Quantize fused Mixture-of-Experts models by unfusing their experts, from declarative specs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {name: importlib.import_module(f"moe_unfuse.cli.commands.{name}") for name in COMMANDS}
    for name, command in plugin_commands().items():
        if name in commands or any(name in a for a in ALIASES.values()):
            raise MoeUnfuseError(
                f"a plugin registers the command {name!r}, which moe-unfuse has; fix: rename the plugin's command"
            )
        commands[name] = command
    for name, command in commands.items():
        doc = (command.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            aliases=ALIASES.get(name, []),
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(_run=command.run, command=name)
    return parser


def plugin_commands() -> dict[str, object]:
    """Commands plugins contribute (``register_commands``). Looked up only when a plugin could add
    one (an entry point is installed, or the plugins are already loaded), so ``--help`` stays light."""
    from importlib.metadata import entry_points

    from ..plugins import manager as plugins

    if not plugins.loaded() and not entry_points(group=plugins.ENTRY_POINT_GROUP):
        return {}
    return dict(plugins.registry().commands)


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
