"""Named activations: every transformers ``ACT2FN`` name."""

from __future__ import annotations

from transformers.activations import ACT2CLS, ACT2FN

from ..plugin import hookimpl


def _factory(name: str):
    def make(**params):
        if not params:
            return ACT2FN[name]
        entry = ACT2CLS[name]
        cls, defaults = entry if isinstance(entry, tuple) else (entry, {})
        return cls(**{**defaults, **params})

    return make


@hookimpl
def register_activations(register):
    for name in ACT2CLS:
        register(name, _factory(name))
