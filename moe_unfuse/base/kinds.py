"""Forward and gate kinds that declare what a spec may say about them.

A plugin registers a plain callable or one of these. Declared roles, options and parameters are
checked when a spec loads (one-line :class:`~moe_unfuse.base.errors.SpecError` each), so a typo fails
there instead of inside a forward; a plain callable is accepted unchecked, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class ForwardKind:
    """An unfused forward and the contract it keeps with specs.

    ``roles``: argument roles the forward reads (each mapped once in ``forward.args``);
    ``options``: other ``forward`` keys it accepts, with a one-line description each;
    ``expert``: ``mlp`` (experts have gate/up/down projections) or ``linear`` (one projection each,
    ``into: [linear]``); ``golden_inputs(module, spec, values, generator)`` returns inputs for roles
    beyond hidden_states/top_k_index/top_k_weights (or replaces them), so ``moe-unfuse check`` can
    drive the forward without code; ``prepare(module, spec, dims)`` resolves options once at plan
    time into ``state.extra["forward"]`` (raising SpecError for values that do not fit the module).
    """

    forward: Callable[..., Any]
    roles: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    expert: str = "mlp"
    golden_inputs: Callable[..., dict[str, Any]] | None = None
    prepare: Callable[..., dict[str, Any]] | None = None

    def __call__(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        return self.forward(module, *args, **kwargs)


@dataclass(frozen=True)
class GateKind:
    """A gating function builder and the parameters a spec may give it.

    ``build(module, cfg, act, split)`` returns ``packed_gate_up -> hidden``; ``params`` maps each
    accepted parameter to a one-line description, ``required`` lists those without a default.
    """

    build: Callable[..., Callable]
    params: Mapping[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    needs_gate_proj: bool = True
    needs_activation: bool = True

    def __call__(self, module: Any, cfg: Mapping[str, Any], act: Any, split: Any) -> Callable:
        return self.build(module, cfg, act, split)


def attr_path(obj: Any, dotted: str) -> Any:
    """``obj.a.b`` for ``"a.b"``: the one reader of a spec's dotted attribute names."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_value(module: Any, value: Any) -> Any:
    """A spec value: a literal, ``{attribute: NAME}`` read from ``module`` or ``{config: NAME}`` from ``module.config``.

    Raises AttributeError naming what is missing (the caller turns it into a SpecError).
    """
    if isinstance(value, Mapping):
        if "attribute" in value:
            try:
                return attr_path(module, value["attribute"])
            except AttributeError:
                raise AttributeError(f"{type(module).__name__} has no attribute {value['attribute']!r}") from None
        if "config" in value:
            config = getattr(module, "config", None)
            if config is None:
                raise AttributeError(f"{type(module).__name__} has no config to read {value['config']!r} from")
            try:
                return attr_path(config, value["config"])
            except AttributeError:
                raise AttributeError(f"{type(config).__name__} has no attribute {value['config']!r}") from None
    return value
