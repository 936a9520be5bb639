"""Named activations: every transformers ``ACT2FN`` name.

The names are read from the installed transformers' ``activations.py`` (its ``ACT2CLS`` literal)
without importing it: registering them then costs no torch or transformers import (seconds), which
every ``moe-unfuse`` command, ``list`` included, would otherwise pay for loading the plugins. Where
the source does not give the names plainly, transformers is imported. Each factory imports it on use.
"""

from __future__ import annotations

import ast
from importlib.util import find_spec
from pathlib import Path

from ..plugin import hookimpl


def _factory(name: str):
    def make(**params):
        from transformers.activations import ACT2CLS, ACT2FN

        if not params:
            return ACT2FN[name]
        entry = ACT2CLS[name]
        cls, defaults = entry if isinstance(entry, tuple) else (entry, {})
        return cls(**{**defaults, **params})

    return make


def activation_names() -> list[str]:
    """``ACT2CLS``'s keys, in order: from the source when it holds them as one dict of string keys."""
    try:
        source = Path(find_spec("transformers").submodule_search_locations[0]) / "activations.py"
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["ACT2CLS"]
                and isinstance(node.value, ast.Dict)
                and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.value.keys)
            ):
                return [k.value for k in node.value.keys]
    except (AttributeError, IndexError, OSError, SyntaxError, TypeError, UnicodeDecodeError):
        pass  # not a plain source install: ask transformers itself
    from transformers.activations import ACT2CLS

    return list(ACT2CLS)


@hookimpl
def register_activations(register):
    for name in activation_names():
        register(name, _factory(name))
