"""``unfuse`` / ``refuse``: plan every module first, then mutate, so a failure leaves the model as it was."""

from __future__ import annotations

import types
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from . import drift
from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError
from .experts import ExpertMLP, ExpertProjection, UnfusedExpertsMixin, UnfuseState, linear_over, unfused_class
from .layout import Split
from .offload import attach_expert_hooks, release_expert_hooks
from .plugins import registry
from .spec import Spec, eval_shape_expr, load_spec


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


def _attr(module: nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_dims(module: nn.Module, spec: Spec, path: str) -> dict[str, int]:
    """Each dim's size: a module attribute, or ``{param: NAME, axis: N}`` read from a parameter's
    shape (for a size that no integer attribute holds)."""
    dims: dict[str, int] = {}
    for name, attr in spec.dims.items():
        if isinstance(attr, dict):
            dims[name] = _param_dim(module, spec, name, attr, path)
            continue
        try:
            value = _attr(module, attr)
        except AttributeError:
            raise SpecError(spec.source, f"dims.{name}", f"{path or type(module).__name__} has no attribute {attr!r}", "name the module attribute that holds this size") from None
        if not isinstance(value, int):
            raise SpecError(spec.source, f"dims.{name}", f"attribute {attr!r} is {type(value).__name__}, not int", "name an integer attribute")
        dims[name] = value
    return dims


def _param_dim(module: nn.Module, spec: Spec, name: str, ref: dict, path: str) -> int:
    try:
        owner, leaf = _owner(module, ref["param"])
        p = owner._parameters.get(leaf)
    except AttributeError:
        p = None
    state = module.__dict__.get("_moe_unfuse")
    if p is None and state is not None:  # unfused: the fused original is kept for refuse
        p = state.originals.get(ref["param"])
    if p is None:
        raise SpecError(spec.source, f"dims.{name}.param", f"{path or type(module).__name__} has no parameter {ref['param']!r}", "name a parameter the class owns")
    if not -p.dim() <= ref["axis"] < p.dim():
        raise SpecError(spec.source, f"dims.{name}.axis", f"{ref['param']} is {p.dim()}-D {list(p.shape)}, it has no axis {ref['axis']}", f"use an axis from 0 to {p.dim() - 1}")
    return int(p.shape[ref["axis"]])


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding a (possibly dotted, ``mlp.w1``) parameter name, and the name's last part."""
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


REST_PREFIX = "_moe_unfuse_rest_"


def _param(module: nn.Module, spec: Spec, field_path: str, name: str, ndim: tuple[int, ...], path: str) -> nn.Parameter:
    try:
        owner, leaf = _owner(module, name)
    except AttributeError:
        owner, leaf = module, name
    p = owner._parameters.get(leaf)
    if p is None:
        raise SpecError(spec.source, field_path, f"{type(module).__name__} at {path or '(root)'} has no parameter {name!r}", "name a parameter the class owns")
    if p.dim() not in ndim:
        raise SpecError(spec.source, field_path, f"{path}.{name} is {p.dim()}-D {list(p.shape)}", f"declare axes for a {p.dim()}-D tensor")
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
                raise SpecError(spec.source, f"{where}.shape", str(exc), "use dims names, integers and + - * //") from None
            if list(fused.shape) != expected:
                raise SpecError(spec.source, f"{where}.shape", f"{path}.{p.name} has shape {list(fused.shape)}, the spec expects {expected}", "fix axes/shape (is the layout transposed?) or the dims attributes")
        layout = p.layout(num_experts)
        prepared = fused
        for op in layout.prepare:
            try:
                prepared = op.apply(prepared)
            except RuntimeError as exc:
                raise SpecError(spec.source, f"{where}.axes", f"{path}.{p.name} {list(fused.shape)}: {exc}", "check the expert count and axes") from None
        if prepared.shape[0] != num_experts:
            raise SpecError(spec.source, f"{where}.axes", f"{path}.{p.name} has {prepared.shape[0]} along the expert axis, num_experts is {num_experts}", "put the expert axis first or fix dims.num_experts")
        if p.extra_experts is not None:
            try:
                extra = eval_shape_expr(p.extra_experts, dims)
            except (KeyError, ValueError) as exc:
                raise SpecError(spec.source, f"{where}.extra_experts", str(exc), "use dims names, integers and + - * //") from None
            if fused.shape[0] != num_experts + extra:
                raise SpecError(spec.source, f"{where}.extra_experts", f"{path}.{p.name} has {fused.shape[0]} expert rows, not num_experts + {extra} = {num_experts + extra}", "fix extra_experts or dims")
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
                raise SpecError(spec.source, f"{where}.bias", f"{path}.{p.bias} has shape {list(b.shape)}, expected {[num_experts, prepared.shape[1]]}", "name the bias of this parameter")
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
        raise SpecError(spec.source, "forward.kind", f"unknown forward kind {spec.forward_kind!r}", f"use one of: {', '.join(sorted(reg.forwards))}")
    forward = reg.forwards[spec.forward_kind]
    if spec.post_expert_norm is not None:
        try:
            norm = _attr(module, spec.post_expert_norm)
        except AttributeError:
            norm = None
        if not callable(norm):
            raise SpecError(spec.source, "post_expert_norm.attribute", f"{path or type(module).__name__} has no module {spec.post_expert_norm!r}", "name the attribute holding the norm")
    prepare = getattr(forward, "prepare", None)
    extra = {"dims": dims, "forward": prepare(module, spec, dims) if prepare is not None else {}, "packed_gate_up": packed_gate_up}
    return Plan(path, module, spec, num_experts, originals, experts, gate_fn, pack, forward, extra, rests)


def build_gate(module: nn.Module, spec: Spec, path: str = "") -> tuple[Any, Any]:
    """The gate function and the gate/up packer of ``module``'s experts (also rebuilt on unpickling:
    a gate is a closure over the module, so it is recomputed rather than pickled)."""
    reg = registry()
    act = _activation(module, spec, path)
    gate_kind = spec.gate["kind"]
    if gate_kind not in reg.gates:
        raise SpecError(spec.source, "gate.kind", f"unknown gate kind {gate_kind!r}", f"use one of: {', '.join(sorted(reg.gates))}")
    gate_param = next((p for p in spec.params if "gate_proj" in p.into), None)
    up_param = next((p for p in spec.params if "up_proj" in p.into), None)
    # gate and up in two tensors (DBRX w1/v1): no packing, each is gated where it was computed
    packing = "separate" if gate_param is not None and gate_param is not up_param else gate_param.packing if gate_param is not None else None
    pack = Split(-1, 2, packing).reverse if packing is not None else None
    split = Split(-1, 2, packing) if packing is not None else Split(-1, 1)
    try:
        gate_fn = reg.gates[gate_kind](module, dict(spec.gate), act, split)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SpecError(spec.source, "gate", f"cannot build {gate_kind!r} gate for {path}: {exc}", "check the gate's parameters against the module") from None
    return gate_fn, pack


def _activation(module: nn.Module, spec: Spec, path: str) -> Any:
    act = spec.activation
    if act is None:
        return None
    if "attribute" in act:
        try:
            return _attr(module, act["attribute"])
        except AttributeError:
            raise SpecError(spec.source, "activation.attribute", f"{path or type(module).__name__} has no attribute {act['attribute']!r}", "name the attribute holding the activation") from None
    reg = registry()
    if act["name"] not in reg.activations:
        raise SpecError(spec.source, "activation.name", f"unknown activation {act['name']!r}", "use a registered name (moe-unfuse list --activations) or a plugin")
    return reg.activations[act["name"]](**act.get("params", {}))


def apply_plan(plan: Plan, swap_class: bool = True) -> None:
    """Replace the fused parameters by per-expert children (the only step that mutates).

    All or nothing for the module: whatever stops it part way (an error, a KeyboardInterrupt)
    finds the module restored to its fused state before the exception propagates.
    """
    module = plan.module
    owners = {id(o): o for o in (module, *(_owner(module, name)[0] for name in plan.originals))}
    saved = (type(module), dict(module.__dict__), dict(module._modules), dict(module._buffers), {k: dict(o._parameters) for k, o in owners.items()})
    try:
        _apply_plan(plan, swap_class)
    except BaseException:
        _rollback(module, owners, saved, module.__dict__.get("_moe_unfuse_offloaded"))
        raise


def _rollback(module: nn.Module, owners: dict[int, nn.Module], saved: tuple, offloaded: Any) -> None:
    """Put back what :func:`_apply_plan` changed: class, attributes, children, buffers, parameters."""
    cls, attrs, modules, buffers, params = saved
    release_expert_hooks(offloaded)
    module.__class__ = cls
    module.__dict__.clear()
    module.__dict__.update(attrs)
    for live, old in ((module._modules, modules), (module._buffers, buffers)):
        live.clear()
        live.update(old)
    for key, owner in owners.items():
        owner._parameters.clear()
        owner._parameters.update(params[key])


def _apply_plan(plan: Plan, swap_class: bool) -> None:
    module = plan.module
    requires_grad = {name: p.requires_grad for name, p in plan.originals.items()}
    any_grad = any(requires_grad.values())
    numerics = plan.spec.linear
    bias_after = numerics.get("bias") == "after_matmul"
    compute_dtype = getattr(torch, numerics["compute_dtype"]) if numerics.get("compute_dtype") else None
    packed = plan.extra.get("packed_gate_up")
    for e, projections in enumerate(plan.experts):
        linears = {proj: linear_over(w, b, any_grad, bias_after, compute_dtype) for proj, (w, b) in projections.items()}
        expert = ExpertProjection(linears["linear"]) if set(linears) == {"linear"} else ExpertMLP.build(linears, plan.pack, plan.gate_fn, packed[e] if packed else None)
        module._modules[str(e)] = expert
    offloaded = attach_expert_hooks(module, plan.spec, plan.num_experts, plan.originals)  # before owners are detached
    module.__dict__["_moe_unfuse_offloaded"] = offloaded  # for a rollback until the state holds it
    owners: dict[str, nn.Module] = {}
    for name in plan.originals:
        owner, leaf = _owner(module, name)
        del owner._parameters[leaf]
        if owner is not module:
            owners[name.rpartition(".")[0]] = owner
    # A submodule emptied of its parameters (DBRX's DbrxExpertGLU) is detached: no longer a child, so
    # no quantizer wraps it, but still an attribute (modelopt's DBRX hook reads ``experts.mlp``).
    detached = {prefix: sub for prefix, sub in owners.items() if "." not in prefix and next(sub.parameters(), None) is None}
    for prefix, sub in detached.items():
        del module._modules[prefix]
        module.__dict__[prefix] = sub
    for name, rest in plan.rests.items():
        module.register_buffer(REST_PREFIX + name.replace(".", "_"), rest, persistent=False)
    module._moe_unfuse = UnfuseState(
        spec=plan.spec,
        original_class=type(module),
        num_experts=plan.num_experts,
        originals=dict(plan.originals),
        forward_fn=plan.forward_fn,
        roles=plan.spec.forward_args,
        extra={**plan.extra, "detached": detached},
    )
    if offloaded:
        module._moe_unfuse.extra["offloaded"] = offloaded  # the values live in accelerate's weights_map
    if swap_class:
        module.__class__ = unfused_class(type(module))
        _rebind_accelerate_forward(module)
    del module.__dict__["_moe_unfuse_offloaded"]


def _rebind_accelerate_forward(module: nn.Module) -> None:
    """accelerate's hooks call ``module._old_forward``, bound to the class the module had when hooked;
    ``remove_hook_from_module`` leaves that bound method behind as an instance ``forward``."""
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)
    forward = module.__dict__.get("forward")
    if isinstance(forward, types.MethodType) and forward.__self__ is module and forward.__func__.__qualname__.endswith(".forward"):
        module.forward = types.MethodType(type(module).forward, module)  # a class's forward, not a user's patch


def _refuse_module(module: nn.Module) -> None:
    state: UnfuseState = module._moe_unfuse
    spec: Spec = state.spec
    experts = [module._modules[str(e)] for e in range(state.num_experts)]
    offloaded = release_expert_hooks(state.extra.get("offloaded"))  # still offloaded: accelerate's weights_map holds the values
    restored: dict[str, nn.Parameter] = dict(state.originals) if offloaded else {}
    for p in () if offloaded else spec.params:
        original = state.originals[p.name]
        weights = [[getattr(x, proj).weight for x in experts] for proj in p.into]
        rest = module._buffers.get(REST_PREFIX + p.name.replace(".", "_"))
        restored[p.name] = _restore(original, weights, p.layout(state.num_experts), rest)
        if p.bias:
            biases = [[getattr(x, proj).bias for x in experts] for proj in p.into]
            restored[p.bias] = _restore(state.originals[p.bias], biases, p.bias_layout())
    for e in range(state.num_experts):
        del module._modules[str(e)]
    for prefix, sub in state.extra.get("detached", {}).items():
        module.__dict__.pop(prefix, None)
        module._modules[prefix] = sub
    for p in spec.params:
        module._buffers.pop(REST_PREFIX + p.name.replace(".", "_"), None)
    for name, value in restored.items():
        owner, leaf = _owner(module, name)
        owner._parameters[leaf] = value
    del module._moe_unfuse
    module.__class__ = state.original_class
    _rebind_accelerate_forward(module)


def _restore(original: nn.Parameter, pieces: list[list[torch.Tensor]], layout: Any, rest: torch.Tensor | None = None) -> nn.Parameter:
    """The original parameter if every piece still views it; else a fresh fused tensor built by the reverse ops."""
    if layout.aliases(original, pieces):
        return original
    with torch.no_grad():
        fused = layout.refuse([[t.detach() for t in part] for part in pieces], rest)
    return nn.Parameter(fused, requires_grad=original.requires_grad)


@dataclass
class ModuleReport:
    path: str
    arch: str
    class_name: str
    num_experts: int
    projections: tuple[str, ...]
    status: str  # "unfused" | "already unfused" | "refused"


@dataclass
class Report:
    """What ``unfuse``/``refuse`` did, module by module."""

    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def changed(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status in ("unfused", "refused")]

    @property
    def num_linears(self) -> int:
        return sum(m.num_experts * len(m.projections) for m in self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {"modules": [vars(m) for m in self.modules], "changed": len(self.changed), "linears": self.num_linears}

    def __str__(self) -> str:
        if not self.modules:
            return "no fused expert modules found"
        lines = [f"{'module':40} {'arch':10} {'class':26} {'experts':>7}  projections  status"]
        for m in self.modules:
            lines.append(f"{m.path or '(root)':40} {m.arch:10} {m.class_name:26} {m.num_experts:>7}  {','.join(m.projections):11}  {m.status}")
        lines.append(f"{len(self.changed)} module(s) changed, {self.num_linears} per-expert linears")
        return "\n".join(lines)


ArchArg = str | Path | Spec | Iterable[str | Path | Spec] | None


def spec_of(arch: str | Path | Spec) -> Spec:
    """A loaded spec, an arch name, or a spec file path (``.yaml``/``.yml``, or an existing file;
    ``extends`` resolves next to it and in the registered spec folders)."""
    if isinstance(arch, Spec):
        return arch
    reg = registry()
    path = Path(arch)
    if isinstance(arch, Path) or path.suffix in (".yaml", ".yml") or path.is_file():
        dirs = tuple(dict.fromkeys(p.parent if p.is_file() else p for p in reg.spec_paths))
        return load_spec(path, dirs)
    return reg.spec(arch)


def _specs_for(arch: ArchArg) -> list[Spec]:
    if arch is None:
        return list(registry().specs().values())
    items = [arch] if isinstance(arch, (str, Path, Spec)) else list(arch)
    return [spec_of(a) for a in items]


def unfuse(model: nn.Module, arch: ArchArg = None, allow_uncovered: bool = False) -> Report:
    """Unfuse, in place, every module a spec matches; atomic and idempotent.

    ``arch``: an arch name, a spec file path, a loaded :class:`Spec`, or several; None tries every known spec.

    Raises :class:`UncoveredExpertsError` when fused expert parameters remain that no spec covers
    (``allow_uncovered=True`` skips them knowingly).
    """
    from .coverage import uncovered_expert_params

    specs = _specs_for(arch)
    report = Report()
    plans: list[Plan] = []
    for path, module in model.named_modules():
        if isinstance(module, UnfusedExpertsMixin):
            st = module._moe_unfuse
            report.modules.append(ModuleReport(path, st.spec.arch, st.original_class.__name__, st.num_experts, st.spec.projection_names(), "already unfused"))
            continue
        spec = next((s for s in specs if s.matches(module)), None)
        if spec is not None:
            with drift.explained(spec, module):
                plans.append(build_plan(module, spec, path))
    if not allow_uncovered:
        # relative to the specs in use: a module matched by a spec that omits one of its fused
        # parameters, or matched only by a spec not passed in ``arch``, would stay fused
        missing = [name for name, _ in uncovered_expert_params(model, specs)]
        if missing:
            raise UncoveredExpertsError(missing)
    if arch is not None and not plans and not report.modules:
        wanted = ", ".join(s.class_name for s in specs)
        raise MoeUnfuseError(f"no {wanted} module in {type(model).__name__}; fix: pass the arch of this model (moe-unfuse list) or arch=None")
    try:
        for plan in plans:
            apply_plan(plan)  # restores its own module if stopped part way
    except BaseException:  # also KeyboardInterrupt: the modules done before go back too
        for plan in reversed(plans):
            if "_moe_unfuse" in plan.module.__dict__:  # unfused by this call: planned modules were fused
                _refuse_module(plan.module)
        raise
    for plan in plans:
        report.modules.append(ModuleReport(plan.path, plan.spec.arch, plan.spec.class_name, plan.num_experts, plan.spec.projection_names(), "unfused"))
    return report


def refuse(model: nn.Module) -> Report:
    """Inverse of :func:`unfuse`: restore each fused parameter, bit for bit."""
    report = Report()
    targets = [(path, m) for path, m in model.named_modules() if isinstance(m, UnfusedExpertsMixin)]
    for path, module in targets:
        st = module._moe_unfuse
        _refuse_module(module)
        report.modules.append(ModuleReport(path, st.spec.arch, st.original_class.__name__, st.num_experts, st.spec.projection_names(), "refused"))
    return report
