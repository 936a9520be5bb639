"""The built-in ``moe-unfuse`` commands, contributed through ``register_commands`` like a plugin's.

Each is named by its module (``moe_unfuse.cli.commands.NAME``, the command's name last), imported when
the command line is parsed: registering them imports nothing. This order is ``moe-unfuse --help``'s.
"""

from __future__ import annotations

from ..plugin import hookimpl

COMMANDS = (
    "moe_unfuse.cli.commands.quantize",
    "moe_unfuse.cli.commands.verify",
    "moe_unfuse.cli.commands.eval",
    "moe_unfuse.cli.commands.list",
    "moe_unfuse.cli.commands.show",
    "moe_unfuse.cli.commands.check",
    "moe_unfuse.cli.commands.audit",
    "moe_unfuse.cli.commands.draft",
    "moe_unfuse.cli.commands.coverage",
)


@hookimpl
def register_commands(register):
    for module in COMMANDS:
        register(module.rpartition(".")[2], module)
