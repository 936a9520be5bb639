"""The typed spec objects (:class:`Spec`, :class:`ParamSpec`) and loading a spec file into them.

The one entry point from a file to a :class:`Spec`: read and merge (``extends``), validate, resolve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..base.errors import SpecError
from ..base.layout import Layout, layout_for
from ..base.versions import is_drifted
from .extends import merged_raw
from .imports import forward_args_problem, resolve_object
from .validation import default_gate_kind, validate


@dataclass(frozen=True)
class ParamSpec:
    """One fused parameter and the per-expert projections it splits into."""

    name: str
    axes: tuple[str, ...]
    into: tuple[str, ...]
    packing: str = "concatenated"
    shape: tuple[str | int, ...] | None = None
    bias: str | None = None
    extra_experts: str | int | None = None

    def layout(self, num_experts: int) -> Layout:
        return layout_for(
            self.axes,
            len(self.into),
            self.packing,
            {"expert": num_experts},
            extra_experts=self.extra_experts is not None,
        )

    def bias_layout(self) -> Layout:
        from ..base.layout import layout_for

        return layout_for(("expert", "out"), len(self.into), self.packing)


@dataclass(frozen=True)
class Spec:
    """A validated, resolved spec; ``raw`` keeps the merged mapping for ``show`` and plugins."""

    arch: str
    source: str
    target_class: str
    match_names: tuple[str, ...]
    verified_on: Mapping[str, tuple[str, ...]]
    #: dim name -> module attribute, or ``{param: NAME, axis: N}`` (the size of a parameter's axis)
    dims: Mapping[str, Any]
    params: tuple[ParamSpec, ...]
    activation: Mapping[str, Any] | None
    gate: Mapping[str, Any]
    forward_kind: str
    forward_args: tuple[tuple[str, str], ...]
    renames: tuple[Mapping[str, str], ...]
    golden: Mapping[str, Any] | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    description: str = ""
    #: ``forward`` keys other than kind and args: the forward kind's options.
    forward_options: Mapping[str, Any] = field(default_factory=dict)
    #: ``linear``: how the original computes each projection (bias, compute_dtype).
    linear: Mapping[str, Any] = field(default_factory=dict)
    #: ``post_expert_norm.attribute``: module applied to each expert's output, or None.
    post_expert_norm: str | None = None
    #: ``export.layout``: how an export stores these experts, ``per_expert`` keys or ``fused`` tensors.
    export_layout: str = "per_expert"
    #: ``export.engines``: engine -> ``{experts: unquantized, modules: [globs], quantized: [names], versions,
    #: why}``, where that engine's loader cannot serve these experts, or those modules, quantized (the export
    #: for ``--engine`` leaves them unquantized), or builds modules quantized that are kept unquantized by
    #: default (the export for ``--engine`` quantizes them).
    export_engines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Spec(arch={self.arch!r}, target={self.target_class!r}, source={self.source!r})"

    @property
    def class_name(self) -> str:
        return self.target_class.rsplit(".", 1)[1]

    def _engine_why(self, engine: str) -> str:
        rule = self.export_engines[engine]
        return f"{engine} {rule['versions']}: {rule['why']}"

    def experts_unquantized_for(self, engine: str) -> str | None:
        """Why ``engine``'s loader needs these experts unquantized (versions and loader file:line), or None."""
        rule = self.export_engines.get(engine) or {}
        return self._engine_why(engine) if rule.get("experts") == "unquantized" else None

    def modules_unquantized_for(self, engine: str) -> tuple[tuple[str, ...], str | None]:
        """Module-name globs ``engine``'s model class builds unquantized (``export.engines.E.modules``) and
        why (versions and loader file:line); ``((), None)`` when there are none."""
        globs = tuple((self.export_engines.get(engine) or {}).get("modules", ()))
        return (globs, self._engine_why(engine)) if globs else ((), None)

    def modules_quantized_for(self, engine: str) -> tuple[tuple[str, ...], str | None]:
        """Modules kept unquantized by default (:data:`moe_unfuse.hub.policy.KEEP_UNQUANTIZED_MODULES` names)
        that ``engine``'s model class builds quantized (``export.engines.E.quantized``), and why."""
        names = tuple((self.export_engines.get(engine) or {}).get("quantized", ()))
        return (names, self._engine_why(engine)) if names else ((), None)

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)

    def projection_names(self) -> tuple[str, ...]:
        return tuple(n for p in self.params for n in p.into)

    def resolve_class(self) -> type | None:
        """The target class, or None when the installed transformers lacks it.

        A SpecError when the spec names something other than an nn.Module subclass, or (unless
        the spec is drifted, which drift.py reports) forward.args that are not the class's
        forward parameters: checked on every first use, also of specs loaded without imports.
        """
        cls = resolve_object(self.target_class, "module", self.source, "target.class", missing_ok=True)
        if cls is not None and not is_drifted(self):
            problem = forward_args_problem(cls, tuple(name for name, _ in self.forward_args))
            if problem:
                raise SpecError(
                    self.source,
                    "forward.args",
                    problem,
                    "use the forward's own parameter names, in its order, as the keys of forward.args",
                )
        return cls

    def matches(self, module: Any) -> bool:
        """An instance of the target class, or of a class named in ``match_names`` (remote code).

        Names are compared first, so testing a model against every spec imports no modeling file.
        """
        names = {c.__name__ for c in type(module).__mro__}
        if names.intersection(self.match_names):
            return True
        if self.class_name not in names:
            return False
        cls = self.resolve_class()
        return cls is not None and isinstance(module, cls)


def parse(raw: dict, source: str, check_import: bool = True) -> Spec:
    """Validate a merged spec mapping and resolve it into a :class:`Spec`."""
    validate(raw, source, check_import)
    params = tuple(
        ParamSpec(
            name=name,
            axes=tuple(p["axes"]),
            into=tuple(p["into"]),
            packing=p.get("packing", "concatenated"),
            shape=tuple(p["shape"]) if p.get("shape") is not None else None,
            bias=p.get("bias"),
            extra_experts=p.get("extra_experts"),
        )
        for name, p in raw["params"].items()
    )
    target = raw["target"]
    return Spec(
        arch=raw["arch"],
        source=source,
        target_class=target["class"],
        match_names=tuple(target.get("match_names", ())),
        verified_on={k: tuple(v) for k, v in target.get("verified_on", {}).items()},
        dims=dict(raw["dims"]),
        params=params,
        activation=raw.get("activation"),
        gate=raw.get("gate", {"kind": default_gate_kind(proj for p in params for proj in p.into)}),
        forward_kind=raw["forward"]["kind"],
        forward_args=tuple(raw["forward"]["args"].items()),
        renames=tuple(raw.get("export", {}).get("renames", ())),
        golden=raw.get("golden"),
        raw=raw,
        description=raw.get("description", ""),
        forward_options={k: v for k, v in raw["forward"].items() if k not in ("kind", "args")},
        linear=dict(raw.get("linear", {})),
        post_expert_norm=raw.get("post_expert_norm", {}).get("attribute"),
        export_layout=raw.get("export", {}).get("layout", "per_expert"),
        export_engines={k: dict(v) for k, v in raw.get("export", {}).get("engines", {}).items()},
    )


def load_spec(path: str | Path, search_dirs: tuple[Path, ...] = (), check_import: bool = True) -> Spec:
    """Load, merge and validate one spec file; raises :class:`SpecError` with a one-line message.

    ``check_import=False`` checks only that the target's module exists (see :func:`~moe_unfuse.spec.validation.validate`).
    """
    path = Path(path)
    raw = merged_raw(path, search_dirs)
    if raw.get("abstract"):
        raise SpecError(
            str(path), "abstract", "is a base spec, not a loadable architecture", "load a spec that extends it"
        )
    return parse(raw, str(path), check_import)
