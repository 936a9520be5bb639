"""moe_unfuse: quantize fused Mixture-of-Experts layers by unfusing them, from declarative specs.

    import moe_unfuse, modelopt.torch.quantization as mtq
    moe_unfuse.register("gemma4")     # before mtq.quantize: every expert becomes per-expert QuantLinears
    moe_unfuse.unfuse(model)          # or unfuse in place, without a quantizer
"""

from __future__ import annotations

from pathlib import Path

from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError, UnknownArchError
from .plugins import register_plugin, registry, unregister_plugin
from .spec import Spec, load_spec
from .unfuse import Report, refuse, unfuse

__all__ = [
    "MoeUnfuseError", "Report", "Spec", "SpecError", "UncoveredExpertsError", "UnknownArchError",
    "get_spec", "list_specs", "load_spec", "refuse", "register", "register_plugin", "unfuse", "unregister_plugin",
]


def list_specs() -> dict[str, Spec]:
    """Every available spec (built-in and from plugins), by arch name."""
    return dict(registry().specs())


def get_spec(arch: str) -> Spec:
    """The spec for ``arch``; :class:`UnknownArchError` lists the known ones."""
    return registry().spec(arch)


def register(arch: str | Spec | Path, backend: str = "modelopt") -> type:
    """Register ``arch``'s experts class with a quantizer backend (modelopt by default), so that a
    following ``mtq.quantize`` converts every expert into per-expert quantized linears.
    ``arch`` may also be a loaded :class:`Spec` or a spec file path. Registering twice is harmless.
    """
    spec = arch if isinstance(arch, Spec) else load_spec(arch) if isinstance(arch, Path) else get_spec(arch)
    backends = registry().backends
    if backend not in backends:
        raise MoeUnfuseError(f"unknown backend {backend!r}; known: {', '.join(backends)}; fix: install the plugin that provides it")
    return backends[backend].register(spec)
