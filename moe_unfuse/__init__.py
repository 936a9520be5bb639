"""moe_unfuse: quantize fused Mixture-of-Experts layers by unfusing them, from declarative specs.

    import moe_unfuse, modelopt.torch.quantization as mtq
    moe_unfuse.register("gemma4")     # before mtq.quantize: every expert becomes per-expert QuantLinears
    moe_unfuse.unfuse(model)          # or unfuse in place, without a quantizer
"""

from __future__ import annotations

from pathlib import Path

from . import drift
from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError, UnknownArchError
from .plugins import register_plugin, registry, unregister_plugin
from .spec import Spec, load_spec
from .unfuse import Report, refuse, unfuse
from .quantize import Coverage, QuantizeResult, check_coverage, quantize_model
from .export import export_checkpoint
from .verify import CheckpointContractError, VerifyReport, verify_checkpoint

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
    return dict(registry().specs())


def get_spec(arch: str) -> Spec:
    """The spec for ``arch``; :class:`UnknownArchError` lists the known ones."""
    return registry().spec(arch)


def register(arch: str | Spec | Path, backend: str = "modelopt", model: "torch.nn.Module | None" = None, allow_uncovered: bool = False) -> type:
    """Register ``arch``'s experts class with a quantizer backend (modelopt by default), so that a
    following ``mtq.quantize`` converts every expert into per-expert quantized linears.
    ``arch`` may also be a loaded :class:`Spec` or a spec file path. Registering twice is harmless.

    With ``model``, raises :class:`UncoveredExpertsError` naming the fused expert parameters of
    ``model`` that no spec registered with this backend so far (this one included) covers, since
    the quantizer would skip them silently; ``allow_uncovered=True`` accepts that knowingly.
    """
    spec = arch if isinstance(arch, Spec) else load_spec(arch) if isinstance(arch, Path) else get_spec(arch)
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
