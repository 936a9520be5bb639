"""The plugin manager and the registry it fills from every plugin's hooks."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import MoeUnfuseError, SpecError, UnknownArchError

DEFAULT_PLUGINS = (
    "moe_unfuse.default_plugins.builtin_specs",
    "moe_unfuse.default_plugins.activations",
    "moe_unfuse.default_plugins.gates",
    "moe_unfuse.default_plugins.routed_forward",
    "moe_unfuse.default_plugins.forwards",
    "moe_unfuse.default_plugins.clamped_gates",
    "moe_unfuse.default_plugins.modelopt_backend",
)

pm = pluggy.PluginManager("moe_unfuse")
pm.add_hookspecs(hookspecs)
for _name in DEFAULT_PLUGINS:
    pm.register(importlib.import_module(_name), name=_name)
pm.load_setuptools_entrypoints("moe_unfuse")


@dataclass
class Registry:
    """Everything the plugins contributed, keyed by name."""

    spec_paths: list[Path] = field(default_factory=list)
    activations: dict[str, Callable] = field(default_factory=dict)
    gates: dict[str, Callable] = field(default_factory=dict)
    forwards: dict[str, Callable] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    _specs: dict[str, Any] | None = None

    def specs(self) -> dict[str, Any]:
        """arch -> Spec for every non-abstract spec file; loaded once, errors raised loudly."""
        if self._specs is None:
            from .spec import load_spec, read_yaml

            found: dict[str, Any] = {}
            dirs = tuple(dict.fromkeys(p.parent if p.is_file() else p for p in self.spec_paths))
            for path in self._spec_files():
                if read_yaml(path).get("abstract"):
                    continue
                spec = load_spec(path, dirs, check_import=False)
                if spec.arch in found:
                    raise SpecError(str(path), "arch", f"{spec.arch!r} is already defined by {found[spec.arch].source}", "rename one of the two specs")
                found[spec.arch] = spec
            self._specs = dict(sorted(found.items()))
        return self._specs

    def _spec_files(self) -> list[Path]:
        files: list[Path] = []
        for p in self.spec_paths:
            files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
        return files

    def spec(self, arch: str) -> Any:
        specs = self.specs()
        if arch not in specs:
            raise UnknownArchError(arch, list(specs))
        return specs[arch]


def _adder(table: dict, what: str) -> Callable:
    def register(name: str, value: Any) -> None:
        if name in table and table[name] is not value:
            raise MoeUnfuseError(f"two plugins register the {what} {name!r}; fix: rename one or unregister the other")
        table[name] = value

    return register


_registry: Registry | None = None


def registry() -> Registry:
    """The registry built from the currently registered plugins (rebuilt after :func:`refresh`)."""
    global _registry
    if _registry is None:
        reg = Registry()
        pm.hook.register_specs(register=lambda path: reg.spec_paths.append(Path(path)))
        pm.hook.register_activations(register=_adder(reg.activations, "activation"))
        pm.hook.register_gates(register=_adder(reg.gates, "gate kind"))
        pm.hook.register_forwards(register=_adder(reg.forwards, "forward kind"))
        pm.hook.register_backends(register=_adder(reg.backends, "backend"))
        _registry = reg
    return _registry


def refresh() -> None:
    """Forget the cached registry, e.g. after ``pm.register(plugin)``."""
    global _registry
    _registry = None


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (entry points are loaded automatically)."""
    pm.register(plugin, name=name)
    refresh()


def unregister_plugin(plugin: object) -> None:
    pm.unregister(plugin)
    refresh()
