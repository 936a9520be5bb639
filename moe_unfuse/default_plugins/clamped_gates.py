"""Clamped SwiGLU gating kinds, declared with their parameters so a spec replaces ``module_method``.

Each parameter is a literal, ``{attribute: NAME}`` (read from the experts module) or
``{config: NAME}`` (from its config), resolved once when the module is unfused. The element-wise
operations are the originals', in the originals' order, on gate and up as unpacked from the same
layout, so the result is bit-identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..plugin import GateKind, hookimpl, resolve_value

if TYPE_CHECKING:
    import torch

_LIMIT = "clamp bound: gate to (-inf, limit], up to [-limit, limit]"


def _number(module: Any, cfg: Mapping[str, Any], name: str) -> float:
    value = resolve_value(module, cfg[name])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} resolves to {value!r}, not a number")
    return value


def clamped_glu(module: Any, cfg: Mapping[str, Any], act: Callable, split: Any) -> Callable:
    """``act(min(gate, limit)) * clamp(up, -limit, limit)`` (DeepSeek-V4; GLM-5-Next and HY-V4 with
    ``activation: {name: silu}``); ``clamp: after_activation`` clamps ``act(gate)`` instead (Step 3.7)."""
    limit = _number(module, cfg, "limit")
    order = cfg.get("clamp", "before_activation")
    if order not in ("before_activation", "after_activation"):
        raise ValueError(f"clamp is {order!r}, not before_activation or after_activation")

    def gate_fn(packed: torch.Tensor) -> torch.Tensor:
        gate, up = split.apply(packed)
        if order == "before_activation":
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return act(gate) * up
        gate = act(gate).clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return gate * up

    return gate_fn


def clamped_swiglu_alpha(module: Any, cfg: Mapping[str, Any], act: Callable, split: Any) -> Callable:
    """GPT-OSS: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``
    (also OpenAI Privacy Filter, MiniMax-M3-VL); no activation module involved."""
    import torch  # when a module is unfused: registering the kind imports no torch

    alpha = _number(module, cfg, "alpha")
    limit = _number(module, cfg, "limit")

    def gate_fn(packed: torch.Tensor) -> torch.Tensor:
        gate, up = split.apply(packed)
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * alpha)
        return (up + 1) * glu

    return gate_fn


CLAMPED_GLU = GateKind(
    build=clamped_glu,
    params={"limit": _LIMIT, "clamp": "before_activation (default) or after_activation: clamp gate, or act(gate)"},
    required=("limit",),
)
CLAMPED_SWIGLU_ALPHA = GateKind(
    build=clamped_swiglu_alpha,
    params={"alpha": "sigmoid slope (GPT-OSS: swiglu_alpha, 1.702)", "limit": _LIMIT},
    required=("alpha", "limit"),
    needs_activation=False,
)


@hookimpl
def register_gates(register):
    register("clamped_glu", CLAMPED_GLU)
    register("clamped_swiglu_alpha", CLAMPED_SWIGLU_ALPHA)
