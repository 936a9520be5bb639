"""Gating kinds: how the packed ``[gate, up]`` projection output becomes the down projection's input.

Each builder gets ``(module, cfg, act, split)``: the experts module, the spec's ``gate`` mapping,
the resolved activation and the :class:`~moe_unfuse.layout.Split` that unpacks gate and up.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


def glu(module, cfg, act, split):
    """``act(gate) * up``: the transformers default ``_apply_gate``."""

    def gate_fn(packed):
        gate, up = split.apply(packed)
        return act(gate) * up

    return gate_fn


def module_method(module, cfg, act, split):
    """The module's own gating method (``_apply_gate`` by default): exact by construction for custom gates."""
    return getattr(module, cfg.get("method", "_apply_gate"))


def non_gated(module, cfg, act, split):
    """``act(up)`` for experts with no gate projection."""
    return act


@hookimpl
def register_gates(register):
    register("glu", glu)
    register("module_method", module_method)
    register("none", non_gated)
