"""The plugin manager, built on first use, and the registry it fills from every plugin's hooks.

As in simonw/llm: built-in features are default plugins registered like third-party ones; the
``moe_unfuse`` entry-point group is loaded when the manager is first built, unless the environment
variable ``MOE_UNFUSE_NO_ENTRY_POINTS`` is set (the test suite sets it: an installed third-party
plugin must not change what the tests see). A plugin that fails to load is one line naming it.

This module sits below the spec loader: it knows the kinds plugins contribute, not specs (the
spec catalog, :mod:`moe_unfuse.spec.catalog`, reads the spec files the plugins register).
"""

from __future__ import annotations

import importlib
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from ..base.errors import MoeUnfuseError, first_line
from . import hookspecs

DEFAULT_PLUGINS = (
    "moe_unfuse.default_plugins.builtin_specs",
    "moe_unfuse.default_plugins.activations",
    "moe_unfuse.default_plugins.gates",
    "moe_unfuse.default_plugins.routed_forward",
    "moe_unfuse.default_plugins.forwards",
    "moe_unfuse.default_plugins.clamped_gates",
    "moe_unfuse.default_plugins.modelopt_backend",
    "moe_unfuse.default_plugins.engines",
    "moe_unfuse.default_plugins.commands",
)
ENTRY_POINT_GROUP = "moe_unfuse"
#: Set (to anything non-empty) to skip third-party plugins from the entry-point group.
NO_ENTRY_POINTS_ENV = "MOE_UNFUSE_NO_ENTRY_POINTS"

_pm: pluggy.PluginManager | None = None


def manager() -> pluggy.PluginManager:
    """The plugin manager: default plugins, then the entry-point group (see the module docstring)."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("moe_unfuse")
        pm.add_hookspecs(hookspecs)
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        if not os.environ.get(NO_ENTRY_POINTS_ENV):
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except Exception as exc:  # noqa: BLE001 - a broken installed plugin: say which, in one line
                raise MoeUnfuseError(
                    f"an installed moe_unfuse plugin failed to load ({first_line(exc)}); fix: repair or uninstall it, or set {NO_ENTRY_POINTS_ENV}=1"
                ) from None
        _pm = pm
    return _pm


@dataclass
class Registry:
    """Everything the plugins contributed, keyed by name, with the plugin that contributed it."""

    spec_paths: list[Path] = field(default_factory=list)
    activations: dict[str, Callable] = field(default_factory=dict)
    gates: dict[str, Callable] = field(default_factory=dict)
    forwards: dict[str, Callable] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, Any] = field(default_factory=dict)  # name -> moe_unfuse.hub.engines.Engine
    contributors: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, name) -> plugin
    import_roots: tuple[str, ...] = ("transformers",)


def _plugin_root(plugin: object) -> str:
    name = plugin.__name__ if isinstance(plugin, types.ModuleType) else getattr(type(plugin), "__module__", "")
    return (name or "").split(".")[0]


def _collect(reg: Registry, hook: str, table: str, what: str) -> None:
    """Call every implementation of ``hook`` with a ``register`` that records who contributed what:
    a name registered by two plugins is an error naming both."""
    pm = manager()
    target = getattr(reg, table)
    for impl in getattr(pm.hook, hook).get_hookimpls():

        def register(name: str, value: Any, _plugin: str = impl.plugin_name) -> None:
            key = (table, name)
            if name in target and target[name] is not value:
                first = reg.contributors[key]
                fix = (
                    f": a plugin registers the {what} {name!r}, which moe-unfuse has; fix: rename the plugin's {what}"
                    if first in DEFAULT_PLUGINS
                    else "; fix: rename one or unregister the other"
                )
                raise MoeUnfuseError(f"plugins {first!r} and {_plugin!r} both register the {what} {name!r}{fix}")
            target[name] = value
            reg.contributors[key] = _plugin

        impl.function(register=register)


_registry: Registry | None = None


def registry() -> Registry:
    """The registry built from the currently registered plugins (rebuilt after :func:`refresh`)."""
    global _registry
    if _registry is None:
        pm = manager()
        reg = Registry()
        pm.hook.register_specs(register=lambda path: reg.spec_paths.append(Path(path)))
        _collect(reg, "register_activations", "activations", "activation")
        _collect(reg, "register_gates", "gates", "gate kind")
        _collect(reg, "register_forwards", "forwards", "forward kind")
        _collect(reg, "register_backends", "backends", "backend")
        _collect(reg, "register_commands", "commands", "command")
        _collect(reg, "register_engines", "engines", "engine")
        for name, engine in reg.engines.items():
            if getattr(engine, "name", name) != name:
                raise MoeUnfuseError(
                    f"plugin {reg.contributors[('engines', name)]!r} registers the engine {engine.name!r} as {name!r}; fix: register it under its own name"
                )
        roots = {"transformers"} | {
            r for p in pm.get_plugins() if (r := _plugin_root(p)) and r not in ("moe_unfuse", "builtins", "types")
        }
        reg.import_roots = tuple(sorted(roots))
        _registry = reg
    return _registry


def refresh() -> None:
    """Forget the cached registry (and the spec catalog built from it), e.g. after registering a plugin."""
    global _registry
    _registry = None


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (entry points are loaded automatically)."""
    manager().register(plugin, name=name)
    refresh()


def unregister_plugin(plugin: object) -> None:
    manager().unregister(plugin)
    refresh()


def is_registered(plugin: object) -> bool:
    return manager().is_registered(plugin)
