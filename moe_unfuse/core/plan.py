"""Plan an unfuse without touching the module: validate it against its spec and compute the
per-expert views, the gate and the forward (pure: the model is not modified).

Below ``experts`` (which rebuilds a gate from here when unpickled) and ``drift`` (which plans on a
meta-device module to see whether a spec still fits); ``unfusing`` applies plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.errors import SpecError
from ..base.kinds import attr_path
from ..base.layout import Split
from ..plugins.manager import registry
from ..spec.expressions import eval_shape_expr
from ..spec.model import Spec


@dataclass
class Plan:
    """Everything needed to unfuse one module, computed without touching it."""

    path: str
    module: nn.Module
    spec: Spec
    num_experts: int
    originals: dict[str, nn.Parameter]
    experts: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]
    gate_fn: Any
    pack: Any
    forward_fn: Any
    #: resolved dims and the forward kind's prepared options (``UnfuseState.extra``)
    extra: dict[str, Any] = field(default_factory=dict)
    #: rows a param's layout sets aside (``extra_experts``), by param name; kept as buffers while unfused
    rests: dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_dims(module: nn.Module, spec: Spec, path: str) -> dict[str, int]:
    """Each dim's size: a module attribute, or ``{param: NAME, axis: N}`` read from a parameter's
    shape (for a size that no integer attribute holds)."""
    dims: dict[str, int] = {}
    for name, attr in spec.dims.items():
        if isinstance(attr, dict):
            dims[name] = _param_dim(module, spec, name, attr, path)
            continue
        try:
            value = attr_path(module, attr)
        except AttributeError:
            raise SpecError(
                spec.source,
                f"dims.{name}",
                f"{path or type(module).__name__} has no attribute {attr!r}",
                "name the module attribute that holds this size",
            ) from None
        if not isinstance(value, int):
            raise SpecError(
                spec.source,
                f"dims.{name}",
                f"attribute {attr!r} is {type(value).__name__}, not int",
                "name an integer attribute",
            )
        dims[name] = value
    return dims


def _param_dim(module: nn.Module, spec: Spec, name: str, ref: dict, path: str) -> int:
    try:
        owner, leaf = owner_of(module, ref["param"])
        p = owner._parameters.get(leaf)
    except AttributeError:
        p = None
    state = module.__dict__.get("_moe_unfuse")
    if p is None and state is not None:  # unfused: the fused original is kept for refuse
        p = state.originals.get(ref["param"])
    if p is None:
        raise SpecError(
            spec.source,
            f"dims.{name}.param",
            f"{path or type(module).__name__} has no parameter {ref['param']!r}",
            "name a parameter the class owns",
        )
    if not -p.dim() <= ref["axis"] < p.dim():
        raise SpecError(
            spec.source,
            f"dims.{name}.axis",
            f"{ref['param']} is {p.dim()}-D {list(p.shape)}, it has no axis {ref['axis']}",
            f"use an axis from 0 to {p.dim() - 1}",
        )
    return int(p.shape[ref["axis"]])


def owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding a (possibly dotted, ``mlp.w1``) parameter name, and the name's last part."""
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


REST_PREFIX = "_moe_unfuse_rest_"


def _param(module: nn.Module, spec: Spec, field_path: str, name: str, ndim: tuple[int, ...], path: str) -> nn.Parameter:
    try:
        owner, leaf = owner_of(module, name)
    except AttributeError:
        owner, leaf = module, name
    p = owner._parameters.get(leaf)
    if p is None:
        raise SpecError(
            spec.source,
            field_path,
            f"{type(module).__name__} at {path or '(root)'} has no parameter {name!r}",
            "name a parameter the class owns",
        )
    if p.dim() not in ndim:
        raise SpecError(
            spec.source,
            field_path,
            f"{path}.{name} is {p.dim()}-D {list(p.shape)}",
            f"declare axes for a {p.dim()}-D tensor",
        )
    return p


def build_plan(module: nn.Module, spec: Spec, path: str = "") -> Plan:
    """Validate ``module`` against ``spec`` and compute the per-expert views; the module is not modified."""
    reg = registry()
    dims = resolve_dims(module, spec, path)
    num_experts = dims["num_experts"]
    originals: dict[str, nn.Parameter] = {}
    rests: dict[str, torch.Tensor] = {}
    pieces: dict[str, tuple[torch.Tensor, ...]] = {}
    packed_gate_up: tuple[torch.Tensor, ...] | None = None
    bias_pieces: dict[str, tuple[torch.Tensor, ...]] = {}
    for p in spec.params:
        where = f"params.{p.name}"
        fused = _param(module, spec, f"{where}.axes", p.name, (len(p.axes),), path)
        if p.shape is not None:
            try:
                expected = [eval_shape_expr(e, dims) for e in p.shape]
            except (KeyError, ValueError) as exc:
                raise SpecError(
                    spec.source, f"{where}.shape", str(exc), "use dims names, integers and + - * //"
                ) from None
            if list(fused.shape) != expected:
                raise SpecError(
                    spec.source,
                    f"{where}.shape",
                    f"{path}.{p.name} has shape {list(fused.shape)}, the spec expects {expected}",
                    "fix axes/shape (is the layout transposed?) or the dims attributes",
                )
        layout = p.layout(num_experts)
        prepared = fused
        for op in layout.prepare:
            try:
                prepared = op.apply(prepared)
            except RuntimeError as exc:
                raise SpecError(
                    spec.source,
                    f"{where}.axes",
                    f"{path}.{p.name} {list(fused.shape)}: {exc}",
                    "check the expert count and axes",
                ) from None
        if prepared.shape[0] != num_experts:
            raise SpecError(
                spec.source,
                f"{where}.axes",
                f"{path}.{p.name} has {prepared.shape[0]} along the expert axis, num_experts is {num_experts}",
                "put the expert axis first or fix dims.num_experts",
            )
        if p.extra_experts is not None:
            try:
                extra = eval_shape_expr(p.extra_experts, dims)
            except (KeyError, ValueError) as exc:
                raise SpecError(
                    spec.source, f"{where}.extra_experts", str(exc), "use dims names, integers and + - * //"
                ) from None
            if fused.shape[0] != num_experts + extra:
                raise SpecError(
                    spec.source,
                    f"{where}.extra_experts",
                    f"{path}.{p.name} has {fused.shape[0]} expert rows, not num_experts + {extra} = {num_experts + extra}",
                    "fix extra_experts or dims",
                )
            rests[p.name] = layout.rest(fused.detach())
        problem = layout.split.check(prepared.shape[1])
        if problem:
            raise SpecError(spec.source, f"{where}.into", f"{path}.{p.name}: {problem}", "check axes and into")
        originals[p.name] = fused
        pieces[p.name] = layout.unfuse(fused)
        if p.into == ("gate_proj", "up_proj") and p.packing == "concatenated" and not p.bias and not spec.linear:
            packed_gate_up = prepared.detach().unbind(0)  # each expert's [gate; up] block: the original's GEMM operand
        if p.bias:
            b = _param(module, spec, f"{where}.bias", p.bias, (2,), path)
            if list(b.shape) != [num_experts, prepared.shape[1]]:
                raise SpecError(
                    spec.source,
                    f"{where}.bias",
                    f"{path}.{p.bias} has shape {list(b.shape)}, expected {[num_experts, prepared.shape[1]]}",
                    "name the bias of this parameter",
                )
            originals[p.bias] = b
            bias_pieces[p.name] = p.bias_layout().unfuse(b)

    experts: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = [{} for _ in range(num_experts)]
    for p in spec.params:
        for k, proj in enumerate(p.into):
            for e in range(num_experts):
                bias = bias_pieces[p.name][k][e] if p.name in bias_pieces else None
                experts[e][proj] = (pieces[p.name][k][e], bias)

    gate_fn, pack = build_gate(module, spec, path)
    if spec.forward_kind not in reg.forwards:
        raise SpecError(
            spec.source,
            "forward.kind",
            f"unknown forward kind {spec.forward_kind!r}",
            f"use one of: {', '.join(sorted(reg.forwards))}",
        )
    forward = reg.forwards[spec.forward_kind]
    if spec.post_expert_norm is not None:
        try:
            norm = attr_path(module, spec.post_expert_norm)
        except AttributeError:
            norm = None
        if not callable(norm):
            raise SpecError(
                spec.source,
                "post_expert_norm.attribute",
                f"{path or type(module).__name__} has no module {spec.post_expert_norm!r}",
                "name the attribute holding the norm",
            )
    prepare = getattr(forward, "prepare", None)
    extra = {
        "dims": dims,
        "forward": prepare(module, spec, dims) if prepare is not None else {},
        "packed_gate_up": packed_gate_up,
    }
    return Plan(path, module, spec, num_experts, originals, experts, gate_fn, pack, forward, extra, rests)


def build_gate(module: nn.Module, spec: Spec, path: str = "") -> tuple[Any, Any]:
    """The gate function and the gate/up packer of ``module``'s experts (also rebuilt on unpickling:
    a gate is a closure over the module, so it is recomputed rather than pickled)."""
    reg = registry()
    act = _activation(module, spec, path)
    gate_kind = spec.gate["kind"]
    if gate_kind not in reg.gates:
        raise SpecError(
            spec.source, "gate.kind", f"unknown gate kind {gate_kind!r}", f"use one of: {', '.join(sorted(reg.gates))}"
        )
    gate_param = next((p for p in spec.params if "gate_proj" in p.into), None)
    up_param = next((p for p in spec.params if "up_proj" in p.into), None)
    # gate and up in two tensors (DBRX w1/v1): no packing, each is gated where it was computed
    packing = (
        "separate"
        if gate_param is not None and gate_param is not up_param
        else gate_param.packing
        if gate_param is not None
        else None
    )
    pack = Split(-1, 2, packing).reverse if packing is not None else None
    split = Split(-1, 2, packing) if packing is not None else Split(-1, 1)
    try:
        gate_fn = reg.gates[gate_kind](module, dict(spec.gate), act, split)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SpecError(
            spec.source,
            "gate",
            f"cannot build {gate_kind!r} gate for {path}: {exc}",
            "check the gate's parameters against the module",
        ) from None
    return gate_fn, pack


def _activation(module: nn.Module, spec: Spec, path: str) -> Any:
    act = spec.activation
    if act is None:
        return None
    if "attribute" in act:
        try:
            return attr_path(module, act["attribute"])
        except AttributeError:
            raise SpecError(
                spec.source,
                "activation.attribute",
                f"{path or type(module).__name__} has no attribute {act['attribute']!r}",
                "name the attribute holding the activation",
            ) from None
    reg = registry()
    if act["name"] not in reg.activations:
        raise SpecError(
            spec.source,
            "activation.name",
            f"unknown activation {act['name']!r}",
            "use a registered name (moe-unfuse list --activations) or a plugin",
        )
    return reg.activations[act["name"]](**act.get("params", {}))
