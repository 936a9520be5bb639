"""What a plugin may import from moe_unfuse: the one public API for hook implementations.

A plugin implements hooks from :mod:`moe_unfuse.plugins.hookspecs` (each hook's contract is its docstring)
and imports from moe_unfuse only what is here. The built-in features in ``moe_unfuse.default_plugins``
are held to the same rule (``tests/test_architecture.py`` fails if one imports anything else from the
package), so each of them is an example a third-party plugin can copy line for line:

- every plugin: :data:`hookimpl`, :class:`SpecError` for a spec the plugin cannot serve, and
  :func:`get_spec` (a registered spec by arch name);
- commands (``register_commands``): an object with a docstring, ``add_arguments`` and ``run``; nothing to import;
- gate kinds (``register_gates``): :class:`GateKind`, :func:`resolve_value` for a spec value given as a
  literal, ``{attribute: NAME}`` or ``{config: NAME}``;
- forward kinds (``register_forwards``): :class:`ForwardKind`, :func:`unfuse_state` (the unfused
  module's spec, expert count, argument binding and prepared options), :func:`resolve_dims` and
  :func:`eval_shape_expr` (the spec's sizes), :func:`post_expert_norm`, :func:`stack_packed`;
- quantizer backends (``register_backends``): :func:`build_plan` and :func:`apply_plan` (unfuse a module
  in place, the class kept), :class:`UnfusedExpertsMixin` (the unfused module's base, for a quantizer's
  dynamic class), :class:`LinearExact` (per-expert linears that repeat the original's numerics),
  :func:`release_free_memory`; for modelopt, :func:`convert_linears` and :func:`install_fast_conversion`
  (the bulk ``QuantLinear`` conversion, :mod:`moe_unfuse.quant.fastquant`);
- serving engines (``register_engines``): :class:`Engine` (a name, a description, its rules),
  :class:`EngineRule` (what the engine's loader requires, with the versions and loader file:line it was
  read from, and its ``check``), :class:`EngineContext` (what a rule's ``check`` reads of the
  checkpoint), :class:`ExpertKey` and :class:`ExpertsModule` (what the context's ``per_expert`` and
  ``experts`` return).

Each name is imported from its defining module on first use, as the package root does, so a plugin
that needs only :data:`hookimpl` (a spec folder) costs no torch import: ``moe-unfuse list`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base.errors import SpecError
    from .base.kinds import ForwardKind, GateKind, resolve_value
    from .base.memory import release_free_memory
    from .core.experts import LinearExact, UnfusedExpertsMixin, post_expert_norm, stack_packed, unfuse_state
    from .core.plan import build_plan, resolve_dims
    from .core.unfusing import apply_plan
    from .hub.engines import Engine, EngineContext, EngineRule, ExpertKey, ExpertsModule
    from .plugins.hookspecs import hookimpl
    from .quant.fastquant import install_plugin as install_fast_conversion
    from .spec.catalog import get_spec
    from .spec.expressions import eval_shape_expr

#: Public name -> (defining module, its name there).
_API = {
    "hookimpl": ("plugins.hookspecs", "hookimpl"),
    "get_spec": ("spec.catalog", "get_spec"),
    "SpecError": ("base.errors", "SpecError"),
    "GateKind": ("base.kinds", "GateKind"),
    "ForwardKind": ("base.kinds", "ForwardKind"),
    "resolve_value": ("base.kinds", "resolve_value"),
    "unfuse_state": ("core.experts", "unfuse_state"),
    "post_expert_norm": ("core.experts", "post_expert_norm"),
    "stack_packed": ("core.experts", "stack_packed"),
    "LinearExact": ("core.experts", "LinearExact"),
    "UnfusedExpertsMixin": ("core.experts", "UnfusedExpertsMixin"),
    "resolve_dims": ("core.plan", "resolve_dims"),
    "build_plan": ("core.plan", "build_plan"),
    "eval_shape_expr": ("spec.expressions", "eval_shape_expr"),
    "apply_plan": ("core.unfusing", "apply_plan"),
    "release_free_memory": ("base.memory", "release_free_memory"),
    "install_fast_conversion": ("quant.fastquant", "install_plugin"),
    "Engine": ("hub.engines", "Engine"),
    "EngineRule": ("hub.engines", "EngineRule"),
    "EngineContext": ("hub.engines", "EngineContext"),
    "ExpertKey": ("hub.engines", "ExpertKey"),
    "ExpertsModule": ("hub.engines", "ExpertsModule"),
}


def convert_linears(linears: list) -> int:
    """modelopt's ``QuantLinear`` conversion of per-expert linears in bulk
    (:func:`moe_unfuse.quant.fastquant.convert_linears`), looked up on each call, so that
    ``fastquant.disabled()`` and a test's patch of it apply to the backend too."""
    from .quant import fastquant

    return fastquant.convert_linears(linears)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(f"{__package__}.{module}"), attr)
    globals()[name] = value
    return value


__all__ = [
    "Engine",
    "EngineContext",
    "EngineRule",
    "ExpertKey",
    "ExpertsModule",
    "ForwardKind",
    "GateKind",
    "LinearExact",
    "SpecError",
    "UnfusedExpertsMixin",
    "apply_plan",
    "build_plan",
    "convert_linears",
    "eval_shape_expr",
    "get_spec",
    "hookimpl",
    "install_fast_conversion",
    "post_expert_norm",
    "release_free_memory",
    "resolve_dims",
    "resolve_value",
    "stack_packed",
    "unfuse_state",
]
