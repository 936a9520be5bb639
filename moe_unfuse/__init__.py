"""moe_unfuse: quantize fused Mixture-of-Experts layers by unfusing them, from declarative specs.

import moe_unfuse, modelopt.torch.quantization as mtq
moe_unfuse.register("gemma4")     # before mtq.quantize: every expert becomes per-expert QuantLinears
moe_unfuse.unfuse(model)          # or unfuse in place, without a quantizer
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from .base.errors import MoeUnfuseError, SpecError, UncoveredExpertsError, UnknownArchError

if TYPE_CHECKING:
    from .core.coverage import Coverage, check_coverage
    from .core.registration import register
    from .core.unfusing import Report, fuse, refuse, unfuse
    from .hub.verify import verify_checkpoint
    from .hub.verify_report import CheckpointContractError, VerifyReport
    from .plugins.hookspecs import hookimpl
    from .plugins.manager import register_plugin, registry, unregister_plugin
    from .quant.export import export_checkpoint
    from .quant.quantize import QuantizeOptions, QuantizeResult, quantize_model, run_quantize
    from .quant.report import QuantizeReport
    from .spec.catalog import get_spec, load_spec
    from .spec.imports import trusted_modules
    from .spec.model import Spec

#: Public name -> the submodule defining it, imported on first use: ``import moe_unfuse`` (and so
#: ``moe-unfuse --help``) stays free of torch, transformers and modelopt until something needs them.
_LAZY = {
    "register_plugin": "plugins.manager",
    "registry": "plugins.manager",
    "unregister_plugin": "plugins.manager",
    "hookimpl": "plugins.hookspecs",
    "Spec": "spec.model",
    "trusted_modules": "spec.imports",
    "load_spec": "spec.catalog",
    "get_spec": "spec.catalog",
    "register": "core.registration",
    "Report": "core.unfusing",
    "fuse": "core.unfusing",
    "refuse": "core.unfusing",
    "unfuse": "core.unfusing",
    "Coverage": "core.coverage",
    "check_coverage": "core.coverage",
    "QuantizeResult": "quant.quantize",
    "quantize_model": "quant.quantize",
    "QuantizeOptions": "quant.quantize",
    "QuantizeReport": "quant.report",
    "run_quantize": "quant.quantize",
    "export_checkpoint": "quant.export",
    "CheckpointContractError": "hub.verify_report",
    "VerifyReport": "hub.verify_report",
    "verify_checkpoint": "hub.verify",
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
    "CheckpointContractError",
    "Coverage",
    "MoeUnfuseError",
    "QuantizeOptions",
    "QuantizeReport",
    "QuantizeResult",
    "Report",
    "Spec",
    "SpecError",
    "UncoveredExpertsError",
    "UnknownArchError",
    "VerifyReport",
    "check_coverage",
    "export_checkpoint",
    "get_spec",
    "fuse",
    "hookimpl",
    "list_specs",
    "load_spec",
    "quantize_model",
    "refuse",
    "register",
    "register_plugin",
    "trusted_modules",
    "registry",
    "run_quantize",
    "unfuse",
    "unregister_plugin",
    "verify_checkpoint",
]


def list_specs() -> dict[str, Spec]:
    """Every available spec (built-in and from plugins), by arch name."""
    from .spec.catalog import specs

    return dict(specs())
