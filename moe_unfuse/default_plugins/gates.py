"""Gating kinds: how the packed ``[gate, up]`` projection output becomes the down projection's input.

Each builder gets ``(module, cfg, act, split)``: the experts module, the spec's ``gate`` mapping,
the resolved activation and the :class:`~moe_unfuse.base.layout.Split` that unpacks gate and up. Each
is a :class:`~moe_unfuse.base.kinds.GateKind`, so a parameter it does not take fails at load.
"""

from __future__ import annotations

from typing import Any, Callable

from ..plugin import GateKind, hookimpl


def glu(module, cfg, act, split):
    """``act(gate) * up``: the transformers default ``_apply_gate``."""

    def gate_fn(packed):
        gate, up = split.apply(packed)
        return act(gate) * up

    return gate_fn


def module_method(module: Any, cfg: Any, act: Any, split: Any) -> Callable:
    """The module's own gating method (``_apply_gate`` by default): exact by construction for custom gates.

    Only a method the experts class itself defines (not one every ``nn.Module`` has, such as
    ``forward`` or ``register_buffer``): a spec names what is called on each expert's output.
    """
    from torch import nn

    name = cfg.get("method", "_apply_gate")
    if not isinstance(name, str) or name.startswith("__") or hasattr(nn.Module, name):
        raise ValueError(f"method {name!r} is not a gating method of the experts class")
    method = getattr(module, name)
    if not callable(method) or getattr(method, "__self__", None) is not module:
        raise ValueError(f"{type(module).__name__}.{name} is not a method")
    return method


def non_gated(module, cfg, act, split):
    """``act(up)`` for experts with no gate projection (unused by single-linear experts, which have no act)."""
    return act


GLU = GateKind(build=glu)
MODULE_METHOD = GateKind(
    build=module_method,
    params={"method": "the experts class's own gating method (default _apply_gate)"},
    needs_activation=False,
)
NON_GATED = GateKind(build=non_gated, needs_gate_proj=False, needs_activation=False)


@hookimpl
def register_gates(register):
    register("glu", GLU)
    register("module_method", MODULE_METHOD)
    register("none", NON_GATED)
