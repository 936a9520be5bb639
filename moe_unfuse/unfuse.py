"""``unfuse`` / ``refuse``: plan every module first, then mutate, so a failure leaves the model as it was."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError
from .experts import ExpertMLP, UnfusedExpertsMixin, UnfuseState, linear_over, unfused_class
from .layout import Split
from .plugins import registry
from .spec import Spec, eval_shape_expr


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


def _attr(module: nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_dims(module: nn.Module, spec: Spec, path: str) -> dict[str, int]:
    dims: dict[str, int] = {}
    for name, attr in spec.dims.items():
        try:
            value = _attr(module, attr)
        except AttributeError:
            raise SpecError(spec.source, f"dims.{name}", f"{path or type(module).__name__} has no attribute {attr!r}", "name the module attribute that holds this size") from None
        if not isinstance(value, int):
            raise SpecError(spec.source, f"dims.{name}", f"attribute {attr!r} is {type(value).__name__}, not int", "name an integer attribute")
        dims[name] = value
    return dims


def _param(module: nn.Module, spec: Spec, field_path: str, name: str, ndim: tuple[int, ...], path: str) -> nn.Parameter:
    p = module._parameters.get(name)
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
    pieces: dict[str, tuple[torch.Tensor, ...]] = {}
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
        problem = layout.split.check(prepared.shape[1])
        if problem:
            raise SpecError(spec.source, f"{where}.into", f"{path}.{p.name}: {problem}", "check axes and into")
        originals[p.name] = fused
        pieces[p.name] = layout.unfuse(fused)
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

    act = _activation(module, spec, path)
    gate_kind = spec.gate["kind"]
    if gate_kind not in reg.gates:
        raise SpecError(spec.source, "gate.kind", f"unknown gate kind {gate_kind!r}", f"use one of: {', '.join(sorted(reg.gates))}")
    gate_param = next((p for p in spec.params if "gate_proj" in p.into), None)
    pack = Split(-1, 2, gate_param.packing).reverse if gate_param is not None else None
    split = Split(-1, 2, gate_param.packing) if gate_param is not None else Split(-1, 1)
    try:
        gate_fn = reg.gates[gate_kind](module, dict(spec.gate), act, split)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SpecError(spec.source, "gate", f"cannot build {gate_kind!r} gate for {path}: {exc}", "check the gate's parameters against the module") from None
    if spec.forward_kind not in reg.forwards:
        raise SpecError(spec.source, "forward.kind", f"unknown forward kind {spec.forward_kind!r}", f"use one of: {', '.join(sorted(reg.forwards))}")
    return Plan(path, module, spec, num_experts, originals, experts, gate_fn, pack, reg.forwards[spec.forward_kind])


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
    """Replace the fused parameters by per-expert children (the only step that mutates)."""
    module = plan.module
    requires_grad = {name: p.requires_grad for name, p in plan.originals.items()}
    any_grad = any(requires_grad.values())
    for e, projections in enumerate(plan.experts):
        linears = {proj: linear_over(w, b, any_grad) for proj, (w, b) in projections.items()}
        module.add_module(str(e), ExpertMLP(linears, plan.pack, plan.gate_fn))
    for name in plan.originals:
        del module._parameters[name]
    module._moe_unfuse = UnfuseState(
        spec=plan.spec,
        original_class=type(module),
        num_experts=plan.num_experts,
        originals=dict(plan.originals),
        forward_fn=plan.forward_fn,
        roles=plan.spec.forward_args,
    )
    if swap_class:
        module.__class__ = unfused_class(type(module))
        _rebind_accelerate_forward(module)


def _rebind_accelerate_forward(module: nn.Module) -> None:
    """accelerate's hooks call ``module._old_forward``, bound to the class the module had when hooked."""
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)


def _refuse_module(module: nn.Module) -> None:
    state: UnfuseState = module._moe_unfuse
    spec: Spec = state.spec
    experts = [module._modules[str(e)] for e in range(state.num_experts)]
    restored: dict[str, nn.Parameter] = {}
    for p in spec.params:
        original = state.originals[p.name]
        weights = [[getattr(x, proj).weight for x in experts] for proj in p.into]
        restored[p.name] = _restore(original, weights, p.layout(state.num_experts))
        if p.bias:
            biases = [[getattr(x, proj).bias for x in experts] for proj in p.into]
            restored[p.bias] = _restore(state.originals[p.bias], biases, p.bias_layout())
    for e in range(state.num_experts):
        del module._modules[str(e)]
    for name, value in restored.items():
        module._parameters[name] = value
    del module._moe_unfuse
    module.__class__ = state.original_class
    _rebind_accelerate_forward(module)


def _restore(original: nn.Parameter, pieces: list[list[torch.Tensor]], layout: Any) -> nn.Parameter:
    """The original parameter if every piece still views it; else a fresh fused tensor built by the reverse ops."""
    if layout.aliases(original, pieces):
        return original
    with torch.no_grad():
        fused = layout.refuse([[t.detach() for t in part] for part in pieces])
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


ArchArg = str | Spec | Iterable[str | Spec] | None


def _specs_for(arch: ArchArg) -> list[Spec]:
    reg = registry()
    if arch is None:
        return list(reg.specs().values())
    items = [arch] if isinstance(arch, (str, Spec)) else list(arch)
    return [a if isinstance(a, Spec) else reg.spec(a) for a in items]


def unfuse(model: nn.Module, arch: ArchArg = None, allow_uncovered: bool = False) -> Report:
    """Unfuse, in place, every module a spec matches; atomic and idempotent.

    ``arch``: an arch name, a loaded :class:`Spec`, or several; None tries every known spec.

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
            plans.append(build_plan(module, spec, path))
    if not allow_uncovered:
        covered = {id(p.module) for p in plans}
        missing = [name for name, mod in uncovered_expert_params(model) if id(mod) not in covered]
        if missing:
            raise UncoveredExpertsError(missing)
    if arch is not None and not plans and not report.modules:
        wanted = ", ".join(s.class_name for s in specs)
        raise MoeUnfuseError(f"no {wanted} module in {type(model).__name__}; fix: pass the arch of this model (moe-unfuse list) or arch=None")
    done: list[Plan] = []
    try:
        for plan in plans:
            apply_plan(plan)
            done.append(plan)
    except BaseException:
        for plan in reversed(done):
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
