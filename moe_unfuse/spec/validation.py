"""Validating a merged spec mapping, in two passes, each failure one :class:`SpecError` line.

The JSON Schema (``spec.schema.json``, published for editors) checks structure; the semantic checks
cover what a schema cannot (axes against packing, shape expressions against dims, the plugins' forward
and gate kinds, export renames, golden settings, importable classes).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Mapping

import jsonschema

from ..base.errors import SpecError
from ..base.kinds import ForwardKind, GateKind
from ..base.layout import layout_for
from ..base.modules import module_source
from ..base.versions import is_drifted
from ..plugins.manager import registry
from .expressions import check_expr
from .imports import check_importable, forward_args_problem, resolve_object
from .limits import clip

SCHEMA_PATH = Path(__file__).with_name("spec.schema.json")


@cache
def schema() -> dict:
    """The published JSON Schema of the spec format."""
    return json.loads(SCHEMA_PATH.read_text())


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


def schema_error(source: str, err: jsonschema.ValidationError) -> SpecError:
    path = clip(".".join(str(p) for p in err.absolute_path), 120) or "(root)"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        field_path = f"{path}.{extra[0]}" if extra and path != "(root)" else (extra[0] if extra else path)
        return SpecError(source, clip(field_path, 120), "unknown key", f"remove it or use one of: {allowed}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        field_path = f"{path}.{missing}" if path != "(root)" else missing
        return SpecError(source, field_path, "missing required field", f"add {missing}")
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return SpecError(source, path, f"{clip(repr(err.instance))} is not allowed", f"use one of: {allowed}")
    if err.validator == "type":
        return SpecError(
            source,
            path,
            f"{clip(repr(err.instance))} is not of type {err.validator_value}",
            f"write a {err.validator_value}",
        )
    return SpecError(source, path, clip(err.message, 160), _FIXES.get(str(err.validator), "see spec.schema.json"))


def validate(raw: dict, source: str, check_import: bool = True) -> None:
    """Both passes over a merged spec mapping: the JSON Schema, then :func:`_check_semantics`; the first
    failure as a :class:`SpecError`. ``check_import=False`` checks only that the target's module exists."""
    errors = sorted(
        jsonschema.Draft202012Validator(schema()).iter_errors(raw),
        key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))),
    )
    if errors:
        raise schema_error(source, errors[0])
    _check_semantics(source, raw, check_import)


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
            raise SpecError(
                source,
                f"{where}.packing",
                "two projections share one axis but packing is not declared",
                "add packing: concatenated or interleaved",
            )
        if len(into) == 1 and p.get("packing") == "interleaved":
            raise SpecError(
                source,
                f"{where}.packing",
                "interleaved packing needs two projections",
                "remove packing or list two names in into",
            )
        axes = p["axes"]
        if (
            len(axes) == 3
            and sorted(a.replace("expert*", "") for a in axes if a != "expert") != ["in", "out"]
            and not any(a.startswith("expert*") for a in axes)
        ):
            raise SpecError(
                source,
                f"{where}.axes",
                f"{axes} must name expert, out and in once each",
                "use [expert, out, in] or [expert, in, out]",
            )
        if axes[0] not in ("expert", "expert*out", "expert*in"):
            raise SpecError(
                source, f"{where}.axes", "the expert axis must come first", "put expert first, e.g. [expert, out, in]"
            )
        try:
            layout_for(axes, len(into), p.get("packing", "concatenated"), {"expert": 1})
        except ValueError as exc:
            raise SpecError(
                source, f"{where}.axes", str(exc), "use [expert, out, in], [expert, in, out] or [expert*out, in]"
            ) from None
        for proj in into:
            if proj in seen:
                raise SpecError(
                    source,
                    f"{where}.into",
                    f"{proj} is already produced by params.{seen[proj]}",
                    "give each projection to one parameter",
                )
            seen[proj] = name
        shape = p.get("shape")
        if shape is not None:
            if len(shape) != len(axes):
                raise SpecError(
                    source,
                    f"{where}.shape",
                    f"{len(shape)} entries for {len(axes)} axes",
                    "give one expression per axis",
                )
            for i, expr in enumerate(shape):
                check_expr(source, f"{where}.shape.{i}", expr, dims)
    if "linear" in seen and _expert_shape(raw) != "linear":
        raise SpecError(
            source,
            f"params.{seen['linear']}.into",
            f"linear is the single projection of an expert_bank-style forward, not of {raw['forward']['kind']!r}",
            "use gate_proj/up_proj/down_proj, or a forward kind whose experts are one linear",
        )
    if _expert_shape(raw) == "mlp" and ("down_proj" not in seen or "up_proj" not in seen):
        raise SpecError(
            source,
            "params",
            "every expert needs up_proj and down_proj",
            "declare params whose into lists up_proj and down_proj",
        )
    if _expert_shape(raw) == "linear" and set(seen) != {"linear"}:
        raise SpecError(
            source,
            "params",
            f"forward kind {raw['forward']['kind']!r} runs one projection per expert, not {sorted(seen)}",
            "declare one param with into: [linear]",
        )
    _check_kinds(source, raw, seen)
    _check_renames(source, raw)
    _check_golden_top_k(source, raw)
    _check_golden_no_model(source, raw)
    cls_path = raw["target"]["class"]
    module = cls_path.rpartition(".")[0]
    check_importable(source, "target.class", module)
    golden = raw.get("golden") or {}
    for where, path in (
        ("golden.config", golden.get("config")),
        ("golden.model.class", (golden.get("model") or {}).get("class")),
        ("golden.model.config", (golden.get("model") or {}).get("config")),
    ):
        if path:
            check_importable(source, where, path.rpartition(".")[0])
    if is_drifted(raw):
        return  # another transformers than verified_on: a missing class is drift, reported on use (drift.py)
    if not check_import:
        # Registry loading: find the module without executing it, nor the packages on its way
        # (importing ~70 modeling files costs seconds); the class is resolved, and reported if missing, on use.
        found = module_source(module)
        if found is None:  # undecidable from the files: ask the import system (imports the parents)
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            raise SpecError(
                source,
                "target.class",
                f"cannot find module {module!r}",
                "fix the import path or install the package that defines it",
            )
        return
    cls = resolve_object(cls_path, "module", source, "target.class")
    problem = forward_args_problem(cls, tuple(raw["forward"]["args"]))
    if problem:
        raise SpecError(
            source,
            "forward.args",
            problem,
            "use the forward's own parameter names, in its order, as the keys of forward.args",
        )
    if golden.get("config"):
        resolve_object(golden["config"], "config", source, "golden.config")
    model = golden.get("model") or {}
    if model.get("class"):
        resolve_object(model["class"], "model", source, "golden.model.class")
    if model.get("config"):
        resolve_object(model["config"], "config", source, "golden.model.config")


def _check_renames(source: str, raw: dict) -> None:
    """``export.engines`` and ``export.renames``: registered engines (a plugin's included, which a
    schema cannot list), compilable patterns, replacements whose groups exist."""
    for engine in raw.get("export", {}).get("engines", {}):
        if engine not in registry().engines:
            raise SpecError(
                source,
                f"export.engines.{clip(engine, 40)}",
                "is not a registered engine",
                f"use one of: {', '.join(registry().engines)}, or install the plugin that registers it",
            )
    for i, rename in enumerate(raw.get("export", {}).get("renames", ())):
        where = f"export.renames.{i}"
        if rename["engine"] not in (*registry().engines, "*"):
            raise SpecError(
                source,
                f"{where}.engine",
                f"unknown engine {clip(rename['engine'], 40)!r}",
                f"use one of: {', '.join(registry().engines)} or *",
            )
        try:
            pattern = re.compile(rename["match"])
        except (re.error, RecursionError, OverflowError) as exc:
            raise SpecError(
                source,
                f"{where}.match",
                f"invalid regex ({clip(str(exc), 80)})",
                "fix the regular expression (Python re syntax)",
            ) from None
        for ref in re.finditer(r"\\(\d+)|\\g<([^>]*)>", rename["replace"]):
            group = ref.group(1) or ref.group(2)
            ok = int(group) <= pattern.groups if group.isdigit() else group in pattern.groupindex
            if not ok:
                raise SpecError(
                    source,
                    f"{where}.replace",
                    f"refers to group {clip(group, 20)!r}, which the pattern does not have",
                    "refer only to groups of match",
                )


#: golden config keys that hold the expert count, read to reject a top_k above it at load
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _check_golden_no_model(source: str, raw: dict) -> None:
    golden = raw.get("golden") or {}
    if golden.get("model") and golden.get("no_model"):
        raise SpecError(
            source,
            "golden.no_model",
            "a spec with a whole tiny model (golden.model) gives no reason for having none",
            "remove golden.no_model, or golden.model if the model cannot work",
        )


def _check_golden_top_k(source: str, raw: dict) -> None:
    golden = raw.get("golden") or {}
    top_k = golden.get("top_k")
    if top_k is None:
        return
    kwargs = golden.get("config_kwargs") or {}
    nested = [v for v in kwargs.values() if isinstance(v, dict)]
    counts = [
        d[k]
        for d in (kwargs, *nested)
        for k in _EXPERT_COUNT_KEYS
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)
    ]
    if counts and top_k > min(counts):
        raise SpecError(
            source,
            "golden.top_k",
            f"{top_k} is more than the golden config's {min(counts)} experts",
            f"use a top_k of at most {min(counts)}",
        )


def _expert_shape(raw: dict) -> str:
    """``mlp`` (gate/up/down experts) or ``linear`` (one projection each), as the forward kind declares."""
    kind = registry().forwards.get(raw["forward"]["kind"])
    return getattr(kind, "expert", "mlp")


def default_gate_kind(projections: Any) -> str:
    """The gate kind of a spec that names none (the format's default): ``glu`` with a gate_proj, else ``none``."""
    return "glu" if "gate_proj" in set(projections) else "none"


def _check_kinds(source: str, raw: dict, seen: Mapping[str, str]) -> None:
    """What the forward and gate kinds declare (roles, options, parameters, expert shape), and the
    fields that depend on them: extra_experts, identity_experts, linear."""
    dims = raw["dims"]
    for name, p in raw["params"].items():
        extra = p.get("extra_experts")
        if extra is None:
            continue
        check_expr(source, f"params.{name}.extra_experts", extra, dims)
        if p["axes"][0] != "expert":
            raise SpecError(
                source,
                f"params.{name}.extra_experts",
                "extra expert rows need an unflattened expert axis",
                "use axes starting with expert, or remove extra_experts",
            )
    fwd = raw["forward"]
    kind = registry().forwards.get(fwd["kind"])
    options = {k: v for k, v in fwd.items() if k not in ("kind", "args")}
    if isinstance(kind, ForwardKind):
        for arg, role in fwd["args"].items():
            if role not in kind.roles:
                raise SpecError(
                    source,
                    f"forward.args.{arg}",
                    f"{role!r} is not a role of forward kind {fwd['kind']!r}",
                    f"use one of: {', '.join(kind.roles)}",
                )
        roles = list(fwd["args"].values())
        if sorted(roles) != sorted(kind.roles):
            raise SpecError(
                source,
                "forward.args",
                f"roles {roles} must be {', '.join(kind.roles)} once each for forward kind {fwd['kind']!r}",
                "map each forward argument to one of these roles",
            )
        for opt in options:
            if opt not in kind.options:
                allowed = ", ".join(kind.options) or "none"
                raise SpecError(
                    source,
                    f"forward.{opt}",
                    f"not an option of forward kind {fwd['kind']!r}",
                    f"remove it or use one of: {allowed}",
                )
    ident = options.get("identity_experts")
    if ident is not None:
        check_expr(source, "forward.identity_experts", ident, dims)
    gate = raw.get("gate") or {"kind": default_gate_kind(seen)}
    gkind = registry().gates.get(gate["kind"]) if gate else None
    if isinstance(gkind, GateKind):
        for key in gate:
            if key != "kind" and key not in gkind.params:
                allowed = ", ".join(gkind.params) or "none"
                raise SpecError(
                    source,
                    f"gate.{key}",
                    f"not a parameter of gate kind {gate['kind']!r}",
                    f"remove it or use one of: {allowed}",
                )
        for key in gkind.required:
            if key not in gate:
                raise SpecError(
                    source,
                    f"gate.{key}",
                    f"gate kind {gate['kind']!r} needs {key}",
                    f"add {key}: a number, {{attribute: NAME}} or {{config: NAME}}",
                )
        if gkind.needs_gate_proj and "gate_proj" not in seen:
            raise SpecError(
                source,
                "gate.kind",
                f"{gate['kind']} needs a gate_proj",
                "add gate_proj to a param's into, or use kind: none",
            )
        if gkind.needs_activation and "activation" not in raw:
            raise SpecError(
                source,
                "activation",
                f"{gate['kind']} gating needs an activation",
                "add activation: {attribute: act_fn} or {name: silu}",
            )
    if raw.get("linear", {}).get("bias") == "after_matmul" and not any(p.get("bias") for p in raw["params"].values()):
        raise SpecError(
            source,
            "linear.bias",
            "after_matmul but no param declares a bias",
            "remove linear.bias or add params.NAME.bias",
        )
