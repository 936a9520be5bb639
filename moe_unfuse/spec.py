"""Spec files: load, merge ``extends``, validate, and resolve into typed objects.

Validation happens in two passes: the JSON Schema (``spec.schema.json``, published for editors)
checks structure; :func:`_check_semantics` checks what a schema cannot (axes against packing,
shape expressions against dims, importable classes). Every failure is one :class:`SpecError` line.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from .drift import is_drifted
from .errors import SpecError
from .layout import Layout, layout_for

SCHEMA_PATH = Path(__file__).with_name("spec.schema.json")


@cache
def schema() -> dict:
    """The published JSON Schema of the spec format."""
    return json.loads(SCHEMA_PATH.read_text())


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
        return layout_for(self.axes, len(self.into), self.packing, {"expert": num_experts}, extra_experts=self.extra_experts is not None)

    def bias_layout(self) -> Layout:
        return layout_for(("expert", "out"), len(self.into), self.packing)


@dataclass(frozen=True)
class Spec:
    """A validated, resolved spec; ``raw`` keeps the merged mapping for ``show`` and plugins."""

    arch: str
    source: str
    target_class: str
    match_names: tuple[str, ...]
    verified_on: Mapping[str, tuple[str, ...]]
    dims: Mapping[str, str]
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

    def __repr__(self) -> str:
        return f"Spec(arch={self.arch!r}, target={self.target_class!r}, source={self.source!r})"

    @property
    def class_name(self) -> str:
        return self.target_class.rsplit(".", 1)[1]

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)

    def projection_names(self) -> tuple[str, ...]:
        return tuple(n for p in self.params for n in p.into)

    def resolve_class(self) -> type | None:
        """The target class, or None when the installed transformers lacks it."""
        module, _, name = self.target_class.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None

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


def _deep_merge(base: dict, over: Mapping) -> dict:
    """``over`` on top of ``base``; a ``null`` in ``over`` removes the base's key (as in JSON Merge Patch)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=512)
def _parse_yaml(path: str, mtime_ns: int) -> Any:
    return yaml.load(Path(path).read_text(), Loader=_YAML_LOADER)


def read_yaml(path: Path) -> dict:
    """The file's mapping; parsed once per file version (base specs are read by every spec extending them)."""
    try:
        data = copy.deepcopy(_parse_yaml(str(path), path.stat().st_mtime_ns))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise SpecError(str(path), where, f"not valid YAML ({getattr(exc, 'problem', exc)})", "fix the YAML syntax") from None
    except OSError as exc:
        raise SpecError(str(path), "(file)", f"cannot be read ({exc.strerror})", "check the path") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), "(root)", "is not a mapping", "write the spec as YAML key: value pairs")
    return data


def merged_raw(path: Path, search_dirs: tuple[Path, ...] = (), _seen: tuple[str, ...] = ()) -> dict:
    """The spec mapping with its ``extends`` chain merged in (base first)."""
    data = read_yaml(path)
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SpecError(str(path), "extends", "must be a string", "name a base spec file stem, e.g. _standard")
    if parent in _seen:
        raise SpecError(str(path), "extends", f"cycle through {parent!r}", "remove the circular extends")
    for d in (path.parent, *search_dirs):
        candidate = d / f"{parent}.yaml"
        if candidate.is_file():
            base = merged_raw(candidate, search_dirs, (*_seen, parent))
            base.pop("abstract", None)
            merged = _deep_merge(base, {k: v for k, v in data.items() if k != "extends"})
            return merged
    raise SpecError(str(path), "extends", f"base spec {parent!r} not found next to the file", f"add {parent}.yaml or fix the name")


_FIXES = {
    "required": "add the missing field",
    "additionalProperties": "remove it or check its spelling against spec.schema.json",
    "type": "use the type the schema asks for",
    "enum": "use one of the allowed values",
    "const": "use the allowed value",
    "pattern": "match the pattern",
    "minItems": "list more items",
    "maxItems": "list fewer items",
    "uniqueItems": "remove the repeated item",
    "minProperties": "declare at least one entry",
    "oneOf": "give exactly one of the alternatives",
}


def _schema_error(source: str, err: jsonschema.ValidationError) -> SpecError:
    path = ".".join(str(p) for p in err.absolute_path) or "(root)"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        field_path = f"{path}.{extra[0]}" if extra and path != "(root)" else (extra[0] if extra else path)
        return SpecError(source, field_path, "unknown key", f"remove it or use one of: {allowed}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        field_path = f"{path}.{missing}" if path != "(root)" else missing
        return SpecError(source, field_path, "missing required field", f"add {missing}")
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return SpecError(source, path, f"{err.instance!r} is not allowed", f"use one of: {allowed}")
    if err.validator == "type":
        return SpecError(source, path, f"{err.instance!r} is not of type {err.validator_value}", f"write a {err.validator_value}")
    return SpecError(source, path, err.message.replace("\n", " "), _FIXES.get(str(err.validator), "see spec.schema.json"))


def _shape_expr_names(expr: str | int) -> set[str]:
    if isinstance(expr, int):
        return set()
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError:
        return {"<syntax>"}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def eval_shape_expr(expr: str | int, dims: Mapping[str, int]) -> int:
    """Evaluate ``2*intermediate``-style expressions: names, integers, + - * // only."""
    if isinstance(expr, int):
        return expr
    tree = ast.parse(str(expr), mode="eval")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.FloorDiv: a // b if b else 0}[type(node.op)]
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(tree)


def _check_semantics(source: str, raw: dict, check_import: bool = True) -> None:
    for key in ("target", "dims", "params", "forward"):
        if key not in raw:
            raise SpecError(source, key, "missing required field", f"add {key} (or extend a base spec that has it)")
    dims = raw["dims"]
    seen: dict[str, str] = {}
    for name, p in raw["params"].items():
        where = f"params.{name}"
        into = p["into"]
        if len(into) == 2 and "packing" not in p:
            raise SpecError(source, f"{where}.packing", "two projections share one axis but packing is not declared", "add packing: concatenated or interleaved")
        if len(into) == 1 and p.get("packing") == "interleaved":
            raise SpecError(source, f"{where}.packing", "interleaved packing needs two projections", "remove packing or list two names in into")
        axes = p["axes"]
        if len(axes) == 3 and sorted(a.replace("expert*", "") for a in axes if a != "expert") != ["in", "out"] and not any(a.startswith("expert*") for a in axes):
            raise SpecError(source, f"{where}.axes", f"{axes} must name expert, out and in once each", "use [expert, out, in] or [expert, in, out]")
        if axes[0] not in ("expert", "expert*out", "expert*in"):
            raise SpecError(source, f"{where}.axes", "the expert axis must come first", "put expert first, e.g. [expert, out, in]")
        try:
            layout_for(axes, len(into), p.get("packing", "concatenated"), {"expert": 1})
        except ValueError as exc:
            raise SpecError(source, f"{where}.axes", str(exc), "use [expert, out, in], [expert, in, out] or [expert*out, in]") from None
        for proj in into:
            if proj in seen:
                raise SpecError(source, f"{where}.into", f"{proj} is already produced by params.{seen[proj]}", "give each projection to one parameter")
            seen[proj] = name
        shape = p.get("shape")
        if shape is not None:
            if len(shape) != len(axes):
                raise SpecError(source, f"{where}.shape", f"{len(shape)} entries for {len(axes)} axes", "give one expression per axis")
            for i, expr in enumerate(shape):
                unknown = _shape_expr_names(expr) - set(dims)
                if unknown:
                    raise SpecError(source, f"{where}.shape.{i}", f"unknown dim {sorted(unknown)[0]!r}", f"use one of dims: {', '.join(dims)}")
    if "linear" in seen and _expert_shape(raw) != "linear":
        raise SpecError(source, f"params.{seen['linear']}.into", f"linear is the single projection of an expert_bank-style forward, not of {raw['forward']['kind']!r}", "use gate_proj/up_proj/down_proj, or a forward kind whose experts are one linear")
    if _expert_shape(raw) == "mlp" and ("down_proj" not in seen or "up_proj" not in seen):
        raise SpecError(source, "params", "every expert needs up_proj and down_proj", "declare params whose into lists up_proj and down_proj")
    if _expert_shape(raw) == "linear" and set(seen) != {"linear"}:
        raise SpecError(source, "params", f"forward kind {raw['forward']['kind']!r} runs one projection per expert, not {sorted(seen)}", "declare one param with into: [linear]")
    gate = raw.get("gate", {"kind": "glu" if "gate_proj" in seen else "none"})
    if gate.get("kind") in ("glu", "module_method") and "gate_proj" not in seen:
        raise SpecError(source, "gate.kind", f"{gate['kind']} needs a gate_proj", "add gate_proj to a param's into, or use kind: none")
    if gate.get("kind") == "glu" and "activation" not in raw:
        raise SpecError(source, "activation", "glu gating needs an activation", "add activation: {attribute: act_fn} or {name: silu}")
    _check_kinds(source, raw, seen)
    roles = list(raw["forward"]["args"].values())
    if raw["forward"]["kind"] == "routed" and sorted(roles) != ["hidden_states", "top_k_index", "top_k_weights"]:
        raise SpecError(source, "forward.args", f"roles {roles} must be hidden_states, top_k_index and top_k_weights once each", "map each forward argument to one role")
    cls_path = raw["target"]["class"]
    module, _, cls_name = cls_path.rpartition(".")
    if is_drifted(raw):
        return  # another transformers than verified_on: a missing class is drift, reported on use (drift.py)
    if not check_import:
        # Registry loading: find the module without executing it (importing ~70 modeling files
        # costs seconds); the class itself is resolved, and reported if missing, on use.
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise SpecError(source, "target.class", f"cannot find module {module!r}", "fix the import path or install the package that defines it")
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise SpecError(source, "target.class", f"cannot import module {module!r} ({exc.__class__.__name__})", "fix the import path or install the package that defines it") from None
    if not hasattr(mod, cls_name):
        raise SpecError(source, "target.class", f"{module} has no class {cls_name!r}", "fix the class name (check the installed transformers version)")


def _expert_shape(raw: dict) -> str:
    """``mlp`` (gate/up/down experts) or ``linear`` (one projection each), as the forward kind declares."""
    from .plugins import registry

    kind = registry().forwards.get(raw["forward"]["kind"])
    return getattr(kind, "expert", "mlp")


def _check_kinds(source: str, raw: dict, seen: Mapping[str, str]) -> None:
    """What the forward and gate kinds declare (roles, options, parameters, expert shape), and the
    fields that depend on them: extra_experts, identity_experts, linear."""
    from .kinds import ForwardKind, GateKind
    from .plugins import registry

    dims = raw["dims"]
    for name, p in raw["params"].items():
        extra = p.get("extra_experts")
        if extra is None:
            continue
        unknown = _shape_expr_names(extra) - set(dims)
        if unknown:
            raise SpecError(source, f"params.{name}.extra_experts", f"unknown dim {sorted(unknown)[0]!r}", f"use one of dims: {', '.join(dims)}")
        if p["axes"][0] != "expert":
            raise SpecError(source, f"params.{name}.extra_experts", "extra expert rows need an unflattened expert axis", "use axes starting with expert, or remove extra_experts")
    fwd = raw["forward"]
    kind = registry().forwards.get(fwd["kind"])
    options = {k: v for k, v in fwd.items() if k not in ("kind", "args")}
    if isinstance(kind, ForwardKind):
        for arg, role in fwd["args"].items():
            if role not in kind.roles:
                raise SpecError(source, f"forward.args.{arg}", f"{role!r} is not a role of forward kind {fwd['kind']!r}", f"use one of: {', '.join(kind.roles)}")
        roles = list(fwd["args"].values())
        if sorted(roles) != sorted(kind.roles):
            raise SpecError(source, "forward.args", f"roles {roles} must be {', '.join(kind.roles)} once each for forward kind {fwd['kind']!r}", "map each forward argument to one of these roles")
        for opt in options:
            if opt not in kind.options:
                allowed = ", ".join(kind.options) or "none"
                raise SpecError(source, f"forward.{opt}", f"not an option of forward kind {fwd['kind']!r}", f"remove it or use one of: {allowed}")
    ident = options.get("identity_experts")
    if ident is not None:
        unknown = _shape_expr_names(ident) - set(dims)
        if unknown:
            raise SpecError(source, "forward.identity_experts", f"unknown dim {sorted(unknown)[0]!r}", f"use one of dims: {', '.join(dims)}")
    gate = raw.get("gate")
    gkind = registry().gates.get(gate["kind"]) if gate else None
    if isinstance(gkind, GateKind):
        for key in gate:
            if key != "kind" and key not in gkind.params:
                allowed = ", ".join(gkind.params) or "none"
                raise SpecError(source, f"gate.{key}", f"not a parameter of gate kind {gate['kind']!r}", f"remove it or use one of: {allowed}")
        for key in gkind.required:
            if key not in gate:
                raise SpecError(source, f"gate.{key}", f"gate kind {gate['kind']!r} needs {key}", f"add {key}: a number, {{attribute: NAME}} or {{config: NAME}}")
        if gkind.needs_gate_proj and "gate_proj" not in seen:
            raise SpecError(source, "gate.kind", f"{gate['kind']} needs a gate_proj", "add gate_proj to a param's into, or use kind: none")
        if gkind.needs_activation and "activation" not in raw:
            raise SpecError(source, "activation", f"{gate['kind']} gating needs an activation", "add activation: {attribute: act_fn} or {name: silu}")
    if raw.get("linear", {}).get("bias") == "after_matmul" and not any(p.get("bias") for p in raw["params"].values()):
        raise SpecError(source, "linear.bias", "after_matmul but no param declares a bias", "remove linear.bias or add params.NAME.bias")


def parse(raw: dict, source: str, check_import: bool = True) -> Spec:
    """Validate a merged spec mapping and resolve it into a :class:`Spec`."""
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(raw), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise _schema_error(source, errors[0])
    _check_semantics(source, raw, check_import)
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
    has_gate = any("gate_proj" in p.into for p in params)
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
        gate=raw.get("gate", {"kind": "glu" if has_gate else "none"}),
        forward_kind=raw["forward"]["kind"],
        forward_args=tuple(raw["forward"]["args"].items()),
        renames=tuple(raw.get("export", {}).get("renames", ())),
        golden=raw.get("golden"),
        raw=raw,
        description=raw.get("description", ""),
        forward_options={k: v for k, v in raw["forward"].items() if k not in ("kind", "args")},
        linear=dict(raw.get("linear", {})),
        post_expert_norm=raw.get("post_expert_norm", {}).get("attribute"),
    )


def load_spec(path: str | Path, search_dirs: tuple[Path, ...] = (), check_import: bool = True) -> Spec:
    """Load, merge and validate one spec file; raises :class:`SpecError` with a one-line message.

    ``check_import=False`` checks only that the target's module exists (see ``_check_semantics``).
    """
    path = Path(path)
    raw = merged_raw(path, search_dirs)
    if raw.get("abstract"):
        raise SpecError(str(path), "abstract", "is a base spec, not a loadable architecture", "load a spec that extends it")
    return parse(raw, str(path), check_import)
