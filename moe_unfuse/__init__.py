"""moe_unfuse: quantize fused Mixture-of-Experts layers by unfusing them, from declarative specs.

import moe_unfuse, modelopt.torch.quantization as mtq
moe_unfuse.register("gemma4")     # before mtq.quantize: every expert becomes per-expert QuantLinears
moe_unfuse.unfuse(model)          # or unfuse in place, without a quantizer
"""

from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from .errors import MoeUnfuseError, SpecError, UncoveredExpertsError, UnknownArchError

if TYPE_CHECKING:
    from .catalog import get_spec, load_spec
    from .coverage import Coverage, check_coverage
    from .export import export_checkpoint
    from .hookspecs import hookimpl
    from .plugins import register_plugin, registry, unregister_plugin
    from .quantize import QuantizeOptions, QuantizeReport, QuantizeResult, quantize_model, run_quantize
    from .registration import register
    from .spec import Spec, trusted_modules
    from .unfusing import Report, fuse, refuse, unfuse
    from .verify import CheckpointContractError, VerifyReport, verify_checkpoint

#: Public name -> the submodule defining it, imported on first use: ``import moe_unfuse`` (and so
#: ``moe-unfuse --help``) stays free of torch, transformers and modelopt until something needs them.
_LAZY = {
    "register_plugin": "plugins",
    "registry": "plugins",
    "unregister_plugin": "plugins",
    "hookimpl": "hookspecs",
    "Spec": "spec",
    "trusted_modules": "spec",
    "load_spec": "catalog",
    "get_spec": "catalog",
    "register": "registration",
    "Report": "unfusing",
    "fuse": "unfusing",
    "refuse": "unfusing",
    "unfuse": "unfusing",
    "Coverage": "coverage",
    "check_coverage": "coverage",
    "QuantizeResult": "quantize",
    "quantize_model": "quantize",
    "QuantizeOptions": "quantize",
    "QuantizeReport": "quantize",
    "run_quantize": "quantize",
    "export_checkpoint": "export",
    "CheckpointContractError": "verify",
    "VerifyReport": "verify",
    "verify_checkpoint": "verify",
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
    from .catalog import specs

    return dict(specs())
