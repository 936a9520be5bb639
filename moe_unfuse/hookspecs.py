"""Every hook a moe_unfuse plugin can implement.

Each hook receives a ``register`` callable and calls it once per thing it contributes, as in
simonw/llm. Built-in features use the same hooks (see ``moe_unfuse.default_plugins``); third-party
packages add theirs through the ``moe_unfuse`` entry-point group. Registering a name twice is an
error naming both contributors, so one plugin cannot silently shadow another.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("moe_unfuse")
hookimpl = pluggy.HookimplMarker("moe_unfuse")


@hookspec
def register_specs(register: Callable) -> None:
    """Contribute spec files: ``register(path)`` with a ``.yaml`` file or a directory of them."""


@hookspec
def register_activations(register: Callable) -> None:
    """Contribute named activations: ``register(name, factory)``, ``factory(**params)`` returns ``tensor -> tensor``."""


@hookspec
def register_gates(register: Callable) -> None:
    """Contribute gating kinds: ``register(kind, build)``, ``build(module, cfg, act, split)`` returns ``packed_gate_up -> hidden``; a ``kinds.GateKind`` also declares its parameters."""


@hookspec
def register_forwards(register: Callable) -> None:
    """Contribute forward kinds: ``register(kind, forward)``, ``forward(module, *args, **kwargs)`` replaces the fused forward; a ``kinds.ForwardKind`` also declares its roles and options."""


@hookspec
def register_backends(register: Callable) -> None:
    """Contribute quantizer backends: ``register(name, backend)``; ``backend.register(spec)`` hooks a spec into that quantizer."""
