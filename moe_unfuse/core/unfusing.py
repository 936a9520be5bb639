"""``unfuse`` / ``fuse``: plan every module first, then mutate, so a failure leaves the model as it was."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, UncoveredExpertsError
from ..spec.catalog import ArchArg, specs_for
from ..spec.model import Spec
from . import drift
from .coverage import uncovered_expert_params
from .experts import ExpertMLP, ExpertProjection, UnfusedExpertsMixin, UnfuseState, linear_over, unfused_class
from .offload import attach_expert_hooks, release_expert_hooks
from .plan import REST_PREFIX, Plan, build_plan, owner_of


def apply_plan(plan: Plan, swap_class: bool = True) -> None:
    """Replace the fused parameters by per-expert children (the only step that mutates).

    All or nothing for the module: whatever stops it part way (an error, a KeyboardInterrupt)
    finds the module restored to its fused state before the exception propagates.
    """
    module = plan.module
    owners = {id(o): o for o in (module, *(owner_of(module, name)[0] for name in plan.originals))}
    saved = (
        type(module),
        dict(module.__dict__),
        dict(module._modules),
        dict(module._buffers),
        {k: dict(o._parameters) for k, o in owners.items()},
    )
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
        expert = (
            ExpertProjection(linears["linear"])
            if set(linears) == {"linear"}
            else ExpertMLP.build(linears, plan.pack, plan.gate_fn, packed[e] if packed else None)
        )
        module._modules[str(e)] = expert
    offloaded = attach_expert_hooks(module, plan.spec, plan.num_experts, plan.originals)  # before owners are detached
    module.__dict__["_moe_unfuse_offloaded"] = offloaded  # for a rollback until the state holds it
    owners: dict[str, nn.Module] = {}
    for name in plan.originals:
        owner, leaf = owner_of(module, name)
        del owner._parameters[leaf]
        if owner is not module:
            owners[name.rpartition(".")[0]] = owner
    # A submodule emptied of its parameters (DBRX's DbrxExpertGLU) is detached: no longer a child, so
    # no quantizer wraps it, but still an attribute (modelopt's DBRX hook reads ``experts.mlp``).
    detached = {
        prefix: sub for prefix, sub in owners.items() if "." not in prefix and next(sub.parameters(), None) is None
    }
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
    if (
        isinstance(forward, types.MethodType)
        and forward.__self__ is module
        and forward.__func__.__qualname__.endswith(".forward")
    ):
        module.forward = types.MethodType(type(module).forward, module)  # a class's forward, not a user's patch


def _fuse_module(module: nn.Module) -> None:
    state: UnfuseState = module._moe_unfuse
    spec: Spec = state.spec
    experts = [module._modules[str(e)] for e in range(state.num_experts)]
    offloaded = release_expert_hooks(
        state.extra.get("offloaded")
    )  # still offloaded: accelerate's weights_map holds the values
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
        owner, leaf = owner_of(module, name)
        owner._parameters[leaf] = value
    del module._moe_unfuse
    module.__class__ = state.original_class
    _rebind_accelerate_forward(module)


def _restore(
    original: nn.Parameter, pieces: list[list[torch.Tensor]], layout: Any, rest: torch.Tensor | None = None
) -> nn.Parameter:
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
    status: str  # "unfused" | "already unfused" | "fused"


@dataclass
class Report:
    """What ``unfuse``/``fuse`` did, module by module."""

    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def changed(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status in ("unfused", "fused")]

    @property
    def num_linears(self) -> int:
        return sum(m.num_experts * len(m.projections) for m in self.changed)

    def __str__(self) -> str:
        if not self.modules:
            return "no fused expert modules found"
        lines = [f"{'module':40} {'arch':10} {'class':26} {'experts':>7}  projections  status"]
        for m in self.modules:
            lines.append(
                f"{m.path or '(root)':40} {m.arch:10} {m.class_name:26} {m.num_experts:>7}  {','.join(m.projections):11}  {m.status}"
            )
        lines.append(f"{len(self.changed)} module(s) changed, {self.num_linears} per-expert linears")
        return "\n".join(lines)


def unfuse(model: nn.Module, arch: ArchArg = None, allow_uncovered: bool = False) -> Report:
    """Unfuse, in place, every module a spec matches; atomic and idempotent.

    ``arch``: an arch name, a spec file path, a loaded :class:`Spec`, or several; None tries every known spec.

    Raises :class:`UncoveredExpertsError` when fused expert parameters remain that no spec covers
    (``allow_uncovered=True`` skips them knowingly).
    """
    specs = specs_for(arch)
    report = Report()
    plans: list[Plan] = []
    for path, module in model.named_modules():
        if isinstance(module, UnfusedExpertsMixin):
            st = module._moe_unfuse
            report.modules.append(
                ModuleReport(
                    path,
                    st.spec.arch,
                    st.original_class.__name__,
                    st.num_experts,
                    st.spec.projection_names(),
                    "already unfused",
                )
            )
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
        raise MoeUnfuseError(
            f"no {wanted} module in {type(model).__name__}; fix: pass the arch of this model (moe-unfuse list) or arch=None"
        )
    try:
        for plan in plans:
            apply_plan(plan)  # restores its own module if stopped part way
    except BaseException:  # also KeyboardInterrupt: the modules done before go back too
        for plan in reversed(plans):
            if "_moe_unfuse" in plan.module.__dict__:  # unfused by this call: planned modules were fused
                _fuse_module(plan.module)
        raise
    for plan in plans:
        report.modules.append(
            ModuleReport(
                plan.path,
                plan.spec.arch,
                plan.spec.class_name,
                plan.num_experts,
                plan.spec.projection_names(),
                "unfused",
            )
        )
    return report


def fuse(model: nn.Module) -> Report:
    """Inverse of :func:`unfuse`: restore each fused parameter, bit for bit."""
    report = Report()
    targets = [(path, m) for path, m in model.named_modules() if isinstance(m, UnfusedExpertsMixin)]
    for path, module in targets:
        st = module._moe_unfuse
        _fuse_module(module)
        report.modules.append(
            ModuleReport(
                path, st.spec.arch, st.original_class.__name__, st.num_experts, st.spec.projection_names(), "fused"
            )
        )
    return report


def refuse(model: nn.Module) -> Report:
    """Deprecated name of :func:`fuse` ("re-fuse", not "decline"); kept for one release."""
    import warnings

    warnings.warn("moe_unfuse.refuse is deprecated; use moe_unfuse.fuse", DeprecationWarning, stacklevel=2)
    return fuse(model)
