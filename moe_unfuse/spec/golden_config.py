"""Building a spec's golden test objects: its transformers config and an instance of its experts class.

Used by the golden checks and drift reports; separate from loading since it runs spec-named code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..base.errors import SpecError, first_line
from .imports import resolve_object

if TYPE_CHECKING:
    from .model import Spec


def golden_config(spec: Spec, implementation: str = "eager") -> Any:
    """The transformers config of ``spec``'s golden test (checked to be a config class before it is
    called), with ``implementation`` as its experts implementation."""
    golden = spec.golden or {}
    config_cls = resolve_object(golden["config"], "config", spec.source, "golden.config")
    try:
        config = config_cls(**golden["config_kwargs"])
    except (TypeError, ValueError) as exc:
        raise SpecError(
            spec.source,
            "golden.config_kwargs",
            f"{config_cls.__name__} rejects them ({exc.__class__.__name__}: {first_line(exc)})",
            "give keyword arguments the config class takes",
        ) from None
    set_experts_implementation(config, implementation)
    return config


def set_experts_implementation(config: Any, implementation: str) -> None:
    """Set ``_experts_implementation`` on a config and its text/ffn sub-configs."""
    for cfg in (config, *(getattr(config, a, None) for a in ("text_config", "ffn_config"))):
        if cfg is not None:
            cfg._experts_implementation = implementation


def golden_experts(spec: Spec, cls: type, implementation: str = "eager") -> Any:
    """An instance of the experts class ``cls`` built as ``golden`` says (config or one of its
    attributes as the first argument, then ``module_kwargs``), on the current default device."""
    golden = spec.golden or {}
    config = golden_config(spec, implementation)
    arg = getattr(config, golden["config_attr"]) if golden.get("config_attr") else config
    args = (arg,) if golden.get("config_arg", True) else ()
    return cls(*args, **golden.get("module_kwargs", {}))
