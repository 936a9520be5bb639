"""moe_unfuse: quantize fused Mixture-of-Experts layers by unfusing them, from declarative specs.

    import moe_unfuse, modelopt.torch.quantization as mtq
    moe_unfuse.register("gemma4")     # before mtq.quantize: every expert becomes per-expert QuantLinears
    moe_unfuse.unfuse(model)          # or unfuse in place, without a quantizer
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError, UnknownArchError

if TYPE_CHECKING:
    import torch

    from .export import export_checkpoint
    from .plugins import register_plugin, registry, unregister_plugin
    from .quantize import Coverage, QuantizeResult, check_coverage, quantize_model
    from .spec import Spec, load_spec
    from .unfusing import Report, refuse, unfuse
    from .verify import CheckpointContractError, VerifyReport, verify_checkpoint

#: Public name -> the submodule defining it, imported on first use: ``import moe_unfuse`` (and so
#: ``moe-unfuse --help``) stays free of torch, transformers and modelopt until something needs them.
_LAZY = {
    "register_plugin": "plugins", "registry": "plugins", "unregister_plugin": "plugins",
    "Spec": "spec", "load_spec": "spec",
    "Report": "unfusing", "refuse": "unfusing", "unfuse": "unfusing",
    "Coverage": "quantize", "QuantizeResult": "quantize", "check_coverage": "quantize", "quantize_model": "quantize",
    "export_checkpoint": "export",
    "CheckpointContractError": "verify", "VerifyReport": "verify", "verify_checkpoint": "verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "CheckpointContractError", "Coverage", "MoeUnfuseError", "QuantizeResult", "Report", "Spec", "SpecError",
    "UncoveredExpertsError", "UnknownArchError", "VerifyReport", "check_coverage", "export_checkpoint", "get_spec",
    "list_specs", "load_spec", "quantize_model", "refuse", "register", "register_plugin", "unfuse", "unregister_plugin",
    "verify_checkpoint",
]

#: Specs registered per backend in this process: ``register(..., model=)`` checks coverage against all of them.
_REGISTERED: dict[str, dict[str, Spec]] = {}


def list_specs() -> dict[str, Spec]:
    """Every available spec (built-in and from plugins), by arch name."""
    from .plugins import registry

    return dict(registry().specs())


def get_spec(arch: str) -> Spec:
    """The spec for ``arch``; :class:`UnknownArchError` lists the known ones."""
    from .plugins import registry

    return registry().spec(arch)


def register(arch: str | Spec | Path, backend: str = "modelopt", model: torch.nn.Module | None = None, allow_uncovered: bool = False) -> type:
    """Register ``arch``'s experts class with a quantizer backend (modelopt by default), so that a
    following ``mtq.quantize`` converts every expert into per-expert quantized linears.
    ``arch`` may also be a loaded :class:`Spec` or a spec file path. Registering twice is harmless.

    With ``model``, raises :class:`UncoveredExpertsError` naming the fused expert parameters of
    ``model`` that no spec registered with this backend so far (this one included) covers, since
    the quantizer would skip them silently; ``allow_uncovered=True`` accepts that knowingly.
    """
    from . import drift
    from .plugins import registry
    from .quantize import check_coverage
    from .unfusing import spec_of

    spec = spec_of(arch)
    drift.check(spec)  # on a transformers not in verified_on: fail here, in one line, if the class changed
    backends = registry().backends
    if backend not in backends:
        raise MoeUnfuseError(f"unknown backend {backend!r}; known: {', '.join(backends)}; fix: install the plugin that provides it")
    cls = backends[backend].register(spec)
    registered = _REGISTERED.setdefault(backend, {})
    registered[spec.arch] = spec
    if model is not None:
        check_coverage(model, list(registered.values()), allow_uncovered)
    return cls
