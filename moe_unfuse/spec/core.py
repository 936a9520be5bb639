"""Spec files: load, merge ``extends``, validate, and resolve into typed objects.

Validation happens in two passes: the JSON Schema (``spec.schema.json``, published for editors)
checks structure; :func:`_check_semantics` checks what a schema cannot (axes against packing,
shape expressions against dims, importable classes). Every failure is one :class:`SpecError` line.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import importlib.util
import json
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import jsonschema
import yaml

from ..base.errors import MoeUnfuseError, SpecError, first_line
from ..base.kinds import ForwardKind, GateKind
from ..base.versions import is_drifted
from ..plugins.manager import registry

if TYPE_CHECKING:
    from ..base.layout import Layout

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
        from ..base.layout import layout_for  # torch: imported on use, so loading specs (list, show) stays light

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

#: Limits on a spec file, far above any real spec (the largest built-in is ~3 KB, 5 levels deep),
#: so hostile input ends in one SpecError before it can exhaust memory, the stack or the C parser.
MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_EXTENDS = 16
MAX_EXPR_CHARS = 200
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
_COLLECTION_TAGS = {"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"}
_NO_KEY = object()
#: parsed mappings by content hash: a file rewritten in the same mtime tick is parsed again
_PARSED: dict[bytes, Any] = {}


def _clip(text: str, limit: int = 80) -> str:
    """One short line of ``text`` (values from a spec can be huge or hold newlines)."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compose(text: str, source: str) -> Any:
    """The YAML document in ``text`` as plain dicts, lists and scalars.

    Built from the parser's events (an iterative state machine, also in libyaml) rather than by
    the composer, which recurses once per nesting level (a deep document crashes the C one), so
    each rule is checked as the event arrives: depth, anchors and aliases (an alias bomb expands
    without bound), duplicate and non-string keys, tags other than plain scalars and collections.
    """
    loader = _YAML_LOADER(text)

    def fail(event: Any, problem: str, fix: str) -> SpecError:
        mark = getattr(event, "start_mark", None)
        return SpecError(source, f"line {mark.line + 1}" if mark is not None else "(file)", problem, fix)

    stack: list[list[Any]] = []  # [container, pending key or _NO_KEY, key -> line]
    root: Any = _NO_KEY
    documents = 0
    try:
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                break
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise fail(event, "holds more than one YAML document", "keep one spec per file (remove the ---)")
                continue
            if isinstance(event, (yaml.StreamStartEvent, yaml.DocumentEndEvent)):
                continue
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise fail(
                    event,
                    "uses a YAML anchor or alias",
                    "write the value out in full (use extends to share a base spec)",
                )
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                value = stack.pop()[0]
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if event.tag not in (None, "!", *_COLLECTION_TAGS):
                    raise fail(
                        event,
                        f"tag {_clip(event.tag, 40)!r} is not allowed",
                        "remove the tag: a spec holds plain mappings, lists and scalars",
                    )
                if len(stack) >= MAX_DEPTH:
                    raise fail(
                        event,
                        f"nests deeper than {MAX_DEPTH} levels",
                        "flatten the value (a spec is a few levels deep)",
                    )
                stack.append([{} if isinstance(event, yaml.MappingStartEvent) else [], _NO_KEY, {}])
                continue
            else:  # ScalarEvent
                value = _scalar(loader, event, fail)
            if not stack:
                root = value
                continue
            top = stack[-1]
            if isinstance(top[0], list):
                top[0].append(value)
            elif top[1] is _NO_KEY:
                if not isinstance(value, str):
                    raise fail(
                        event,
                        f"key {_clip(repr(value), 40)} is a {type(value).__name__}, not a string",
                        "write every key as a plain name",
                    )
                if value in top[2]:
                    raise fail(
                        event,
                        f"duplicate key {_clip(value, 40)!r} (first on line {top[2][value]})",
                        "keep one of the two",
                    )
                top[2][value] = event.start_mark.line + 1
                top[1] = value
            else:
                top[0][top[1]] = value
                top[1] = _NO_KEY
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        if "nesting depth" in str(exc):  # libyaml 0.2.5+ stops deep documents itself, before our check
            raise SpecError(
                source,
                where,
                f"nests deeper than {MAX_DEPTH} levels",
                "flatten the value (a spec is a few levels deep)",
            ) from None
        raise SpecError(
            source, where, f"not valid YAML ({_clip(str(getattr(exc, 'problem', None) or exc))})", "fix the YAML syntax"
        ) from None
    finally:
        loader.dispose()
    return None if root is _NO_KEY else root


def _scalar(loader: Any, event: Any, fail: Any) -> Any:
    """A scalar event's value, resolved as the safe loader would (YAML 1.1 ints, floats, bools, null)."""
    tag = event.tag
    if tag in (None, "!"):
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    elif tag not in _SCALAR_TAGS:
        raise fail(
            event,
            f"tag {_clip(tag, 40)!r} is not allowed",
            "remove the tag: a spec holds plain mappings, lists and scalars",
        )
    if tag not in _SCALAR_TAGS:  # e.g. an unquoted date: kept as the text it is
        return event.value
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
    try:
        return loader.yaml_constructors[tag](loader, node)
    except (ValueError, yaml.YAMLError) as exc:  # e.g. an integer with more digits than Python converts
        raise fail(
            event,
            f"cannot read {_clip(event.value, 40)!r} ({_clip(str(exc), 60)})",
            "write a smaller number or quote the value",
        ) from None


def read_yaml(path: Path) -> dict:
    """The file's mapping; parsed once per file content (base specs are read by every spec extending them)."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                source,
                "(file)",
                f"is {size} bytes, over the {MAX_SPEC_BYTES}-byte limit for a spec",
                "a spec is a few KB: remove what does not belong in it",
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(
            source, "(file)", f"cannot be read ({exc.strerror or exc.__class__.__name__})", "check the path"
        ) from None
    if len(data) > MAX_SPEC_BYTES:  # grew since stat
        raise SpecError(
            source,
            "(file)",
            f"is over the {MAX_SPEC_BYTES}-byte limit for a spec",
            "a spec is a few KB: remove what does not belong in it",
        )
    key = hashlib.blake2b(data, digest_size=16).digest()
    parsed = _PARSED.get(key, _NO_KEY)
    if parsed is _NO_KEY:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SpecError(
                source, f"line {line}", f"byte {exc.start} is not UTF-8 ({exc.reason})", "save the file as UTF-8"
            ) from None
        parsed = _compose(text.removeprefix("\ufeff"), source)
        if len(_PARSED) >= 512:
            _PARSED.clear()
        _PARSED[key] = parsed
    if not isinstance(parsed, dict):
        raise SpecError(source, "(root)", "is not a mapping", "write the spec as YAML key: value pairs")
    return copy.deepcopy(parsed)


_EXTENDS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _find_base(path: Path, parent: Any, search_dirs: tuple[Path, ...]) -> Path:
    """The file ``extends: parent`` names: a bare file stem, looked up only in the spec search path."""
    if not isinstance(parent, str):
        raise SpecError(str(path), "extends", "must be a string", "name a base spec file stem, e.g. _standard")
    if not _EXTENDS_NAME.fullmatch(parent):
        raise SpecError(
            str(path),
            "extends",
            f"{_clip(parent, 60)!r} is not a spec file stem (no paths, no '..')",
            "name a base spec in the same folder or the built-in specs, e.g. _standard",
        )
    for d in (path.parent, *search_dirs):
        candidate = d / f"{parent}.yaml"
        if candidate.is_file() and candidate.resolve().parent == d.resolve():
            return candidate
    raise SpecError(
        str(path), "extends", f"base spec {parent!r} not found next to the file", f"add {parent}.yaml or fix the name"
    )


def merged_raw(path: Path, search_dirs: tuple[Path, ...] = ()) -> dict:
    """The spec mapping with its ``extends`` chain merged in (base first)."""
    chain = [(path, read_yaml(path))]
    seen = {path.stem}
    while "extends" in chain[-1][1]:
        here, data = chain[-1]
        parent = data["extends"]
        base = _find_base(here, parent, search_dirs)
        if parent in seen:
            raise SpecError(str(here), "extends", f"cycle through {parent!r}", "remove the circular extends")
        if len(chain) > MAX_EXTENDS:
            raise SpecError(
                str(path), "extends", f"chain longer than {MAX_EXTENDS} files", "extend a base spec directly"
            )
        seen.add(parent)
        chain.append((base, read_yaml(base)))
    merged = chain[-1][1]
    for _, data in reversed(chain[:-1]):
        merged.pop("abstract", None)
        merged = _deep_merge(merged, {k: v for k, v in data.items() if k != "extends"})
    merged.pop("extends", None)
    return merged


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
    path = _clip(".".join(str(p) for p in err.absolute_path), 120) or "(root)"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        field_path = f"{path}.{extra[0]}" if extra and path != "(root)" else (extra[0] if extra else path)
        return SpecError(source, _clip(field_path, 120), "unknown key", f"remove it or use one of: {allowed}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        field_path = f"{path}.{missing}" if path != "(root)" else missing
        return SpecError(source, field_path, "missing required field", f"add {missing}")
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return SpecError(source, path, f"{_clip(repr(err.instance))} is not allowed", f"use one of: {allowed}")
    if err.validator == "type":
        return SpecError(
            source,
            path,
            f"{_clip(repr(err.instance))} is not of type {err.validator_value}",
            f"write a {err.validator_value}",
        )
    return SpecError(source, path, _clip(err.message, 160), _FIXES.get(str(err.validator), "see spec.schema.json"))


_EXPR_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def _parse_expr(expr: str | int) -> ast.AST:
    """The syntax tree of a dims expression; ValueError naming what is wrong (too long, syntax, an
    operation other than + - * //), never a RecursionError on a hostile one."""
    text = str(expr)
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression is {len(text)} characters, over {MAX_EXPR_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(
            f"syntax error in {_clip(text, 60)!r} ({getattr(exc, 'msg', None) or exc.__class__.__name__})"
        ) from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Name, ast.Load, *_EXPR_OPS)) or (
            isinstance(node, ast.BinOp) and type(node.op) in _EXPR_OPS
        )
        ok = ok or (isinstance(node, ast.Constant) and type(node.value) is int)
        if not ok:
            raise ValueError(
                f"{_clip(text, 60)!r}: {type(node).__name__} is not allowed (dims names, integers and + - * // only)"
            )
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.FloorDiv)
            and isinstance(node.right, ast.Constant)
            and node.right.value == 0
        ):
            raise ValueError(f"{_clip(text, 60)!r} divides by zero")
    return tree


def _check_expr(source: str, where: str, expr: str | int, dims: Mapping[str, Any]) -> None:
    """A dims expression that parses, uses only + - * // and names only declared dims."""
    if isinstance(expr, int):
        return
    try:
        tree = _parse_expr(expr)
    except ValueError as exc:
        raise SpecError(
            source,
            where,
            str(exc),
            "write an expression over dims names with integers and + - * //, e.g. 2*intermediate",
        ) from None
    unknown = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(dims)
    if unknown:
        raise SpecError(
            source, where, f"unknown dim {_clip(sorted(unknown)[0], 40)!r}", f"use one of dims: {', '.join(dims)}"
        )


def eval_shape_expr(expr: str | int, dims: Mapping[str, int]) -> int:
    """Evaluate ``2*intermediate``-style expressions: names, integers, + - * // only.

    Raises KeyError for an unknown name and ValueError for anything else (a division by zero too:
    a size that cannot be computed is an error, not 0).
    """
    if isinstance(expr, int):
        return expr

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims[node.id])
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.FloorDiv) and b == 0:
            raise ValueError(f"{_clip(str(expr), 60)!r} divides by zero")
        return _EXPR_OPS[type(node.op)](a, b)

    return ev(_parse_expr(expr))


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
        from ..base.layout import layout_for  # torch, on the first spec validated

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
                _check_expr(source, f"{where}.shape.{i}", expr, dims)
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
    _check_importable(source, "target.class", module)
    golden = raw.get("golden") or {}
    for where, path in (
        ("golden.config", golden.get("config")),
        ("golden.model.class", (golden.get("model") or {}).get("class")),
        ("golden.model.config", (golden.get("model") or {}).get("config")),
    ):
        if path:
            _check_importable(source, where, path.rpartition(".")[0])
    if is_drifted(raw):
        return  # another transformers than verified_on: a missing class is drift, reported on use (drift.py)
    if not check_import:
        # Registry loading: find the module without executing it (importing ~70 modeling files
        # costs seconds); the class itself is resolved, and reported if missing, on use.
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


#: What a spec may name (``target.class``, ``golden.config``, ``golden.model.class``/``config``)
#: and the base class each must be: nothing a spec names is called unless it is one of these.
KINDS = {
    "module": ("torch.nn", "Module", "an nn.Module subclass (the fused experts class)"),
    "config": ("transformers", "PretrainedConfig", "a transformers PretrainedConfig subclass"),
    "model": ("transformers", "PreTrainedModel", "a transformers PreTrainedModel subclass"),
}


def allowed_import_roots() -> tuple[str, ...]:
    """Top-level packages whose modules a spec may import: transformers, the package of every
    registered moe_unfuse plugin (code the user already chose to run, via the entry point group),
    and the modules the user trusts for the current call (:func:`trusted_modules`)."""
    return tuple(dict.fromkeys((*registry().import_roots, *_TRUSTED.get())))


#: Modules the user consented to, for the duration of one call (never read from a spec).
_TRUSTED: ContextVar[tuple[str, ...]] = ContextVar("moe_unfuse_trusted_modules", default=())
_MODULE_NAME_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@contextmanager
def trusted_modules(names: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, specs may import the modules ``names`` (and their submodules): the user's
    explicit consent (``--trust-module``, ``register(..., trust_modules=...)``), as ``trust_remote_code``
    is for transformers, for a model class not in transformers nor in a plugin. A spec cannot give
    itself this consent; a name that is not a module path is a one-line error."""
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME_RE.fullmatch(name):
            raise MoeUnfuseError(
                f"trusted module {_clip(repr(name), 60)} is not a module name; fix: pass a dotted module path, e.g. mymodels"
            )
    token = _TRUSTED.set(tuple(dict.fromkeys((*_TRUSTED.get(), *names))))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _check_importable(source: str, where: str, module: str) -> None:
    """``module`` may be imported for a spec: under an allowed root, trusted by the user, already
    imported (looked up, not run), or under a package that does not exist at all (its import fails:
    nothing runs)."""
    root = module.split(".")[0]
    if root in registry().import_roots or module in sys.modules:
        return
    if any(module == t or module.startswith(t + ".") for t in _TRUSTED.get()):
        return
    try:
        exists = importlib.util.find_spec(root) is not None  # a path search: runs no module code
    except (ImportError, ValueError):
        exists = False
    if not exists:
        return
    raise SpecError(
        source,
        where,
        f"module {_clip(module, 60)!r} is outside what a spec may import ({', '.join(allowed_import_roots())})",
        "name a class in transformers, install the plugin that provides it, or trust your own module with "
        "--trust-module (see CONTRIBUTING.md, What a spec may import)",
    )


def resolve_object(path: str, kind: str | None, source: str, where: str, missing_ok: bool = False) -> Any:
    """The class ``path`` names, checked to be of ``kind`` (see :data:`KINDS`; None: any of them)
    before anything calls it.

    Imports only what :func:`_check_importable` allows. ``missing_ok``: None when the module or the
    name does not exist (a class of another transformers version) instead of a SpecError.
    """
    module, _, name = path.rpartition(".")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module) or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise SpecError(source, where, f"{_clip(path, 60)!r} is not an import path", "write package.module.ClassName")
    _check_importable(source, where, module)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if missing_ok:
            return None
        raise SpecError(
            source,
            where,
            f"cannot import module {module!r} ({exc.__class__.__name__})",
            "fix the import path or install the package that defines it",
        ) from None
    obj = getattr(mod, name, None)
    if obj is None:
        if missing_ok:
            return None
        raise SpecError(
            source,
            where,
            f"{module} has no class {name!r}",
            "fix the class name (check the installed transformers version)",
        )
    kinds = [KINDS[kind]] if kind is not None else list(KINDS.values())
    bases = tuple(getattr(importlib.import_module(m), n) for m, n, _ in kinds)
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        what = " or ".join(w for _, _, w in kinds)
        raise SpecError(source, where, f"{_clip(path, 80)} is not {what}", f"name {what}")
    return obj


def forward_args_problem(cls: type, names: tuple[str, ...]) -> str | None:
    """Why ``forward.args`` (its keys, in order) are not the leading parameters of ``cls.forward``, or None.

    The unfused forward binds positional arguments by this order and keyword arguments by these
    names, so both must be the original's own.
    """
    import inspect

    fn = inspect.unwrap(cls.forward)
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    actual = [p.name for p in params]
    if actual[: len(names)] != list(names):
        return f"forward({', '.join(names)}) but {cls.__name__}.forward takes ({', '.join(actual)})"
    return None


def _check_renames(source: str, raw: dict) -> None:
    """``export.renames``: known engines, compilable patterns, replacements whose groups exist."""
    for i, rename in enumerate(raw.get("export", {}).get("renames", ())):
        where = f"export.renames.{i}"
        if rename["engine"] not in (*registry().engines, "*"):
            raise SpecError(
                source,
                f"{where}.engine",
                f"unknown engine {_clip(rename['engine'], 40)!r}",
                f"use one of: {', '.join(registry().engines)} or *",
            )
        try:
            pattern = re.compile(rename["match"])
        except (re.error, RecursionError, OverflowError) as exc:
            raise SpecError(
                source,
                f"{where}.match",
                f"invalid regex ({_clip(str(exc), 80)})",
                "fix the regular expression (Python re syntax)",
            ) from None
        for ref in re.finditer(r"\\(\d+)|\\g<([^>]*)>", rename["replace"]):
            group = ref.group(1) or ref.group(2)
            ok = int(group) <= pattern.groups if group.isdigit() else group in pattern.groupindex
            if not ok:
                raise SpecError(
                    source,
                    f"{where}.replace",
                    f"refers to group {_clip(group, 20)!r}, which the pattern does not have",
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
        _check_expr(source, f"params.{name}.extra_experts", extra, dims)
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
        _check_expr(source, "forward.identity_experts", ident, dims)
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


def parse(raw: dict, source: str, check_import: bool = True) -> Spec:
    """Validate a merged spec mapping and resolve it into a :class:`Spec`."""
    errors = sorted(
        jsonschema.Draft202012Validator(schema()).iter_errors(raw),
        key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))),
    )
    if errors:
        raise schema_error(source, errors[0])
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

    ``check_import=False`` checks only that the target's module exists (see ``_check_semantics``).
    """
    path = Path(path)
    raw = merged_raw(path, search_dirs)
    if raw.get("abstract"):
        raise SpecError(
            str(path), "abstract", "is a base spec, not a loadable architecture", "load a spec that extends it"
        )
    return parse(raw, str(path), check_import)


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
