"""Audit a model from its config alone: what it holds, what a quantizer would do, what it would weigh.

The model is built on the meta device (no weights, nothing downloaded, no memory), so a
Gemma-4-26B-A4B-sized config audits on a laptop in seconds. The report lists every fused expert
parameter and the spec that covers it (none: the silent-skip bug, made loud), parameters by
category, what a modelopt preset would quantize and exclude once the experts are unfused, and
the estimated checkpoint size per format.

The quantize/exclude decision replays the preset's own ``quant_cfg`` rules from the installed
``modelopt_recipes`` YAML files (read directly: importing modelopt costs more than the whole
audit), against the module names the model has *after* unfusing (``...experts.{E}.gate_proj``).
Sizes count what an exported checkpoint stores: unquantized tensors in bf16; a quantized weight
in its element format, plus block scales (NVFP4: one e4m3 per 16 elements), plus one fp32
per-tensor scale (FP8 ``weight_scale`` / NVFP4 ``weight_scale_2``) and one fp32 ``input_scale``
when the input quantizer is on. Buffers are not counted (they are bytes, not gigabytes).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, SpecError, first_line
from ..core.coverage import FusedParam, find_fused_params
from ..core.plan import build_plan
from ..hub.loading import transformers_class
from ..hub.policy import QuantRules, disable_entries
from ..spec.model import Spec
from .presets import Numerics, preset_rules

#: formats of the size table; any other modelopt preset name works with ``qformat``
SIZE_FORMATS = ("bf16", "fp8", "nvfp4", "nvfp4_experts_only")
CATEGORIES = {
    "experts": "experts",
    "attention": "attention",
    "dense_mlp": "dense MLP",
    "router": "router",
    "embeddings": "embeddings",
    "lm_head": "lm_head",
    "norms": "norms",
    "vision_audio": "vision/audio",
    "other": "other",
}
_MULTIMODAL = (
    "vision",
    "visual",
    "audio",
    "image",
    "speech",
    "video",
    "multi_modal",
    "multimodal",
    "mm_projector",
    "embed_vision",
    "embed_audio",
)
_DENSE_MLP = ("mlp", "feed_forward", "ffn", "shared_expert", "shared_experts", "shared_mlp", "dense")
_ROUTER = ("router", "gate", "shared_expert_gate")
GB = 1e9
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# config -> meta model


def load_config(path: str | Path) -> Any:
    """A transformers config from a model folder or a ``config.json``, offline; one-line errors."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if p.is_dir() and not file.is_file():
        raise MoeUnfuseError(
            f"{p}: no config.json in this folder; fix: pass a local model folder or its config.json (audit never downloads)"
        )
    if not file.is_file():
        raise MoeUnfuseError(
            f"{p}: no such file or folder; fix: pass a local model folder or its config.json (audit never downloads)"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise MoeUnfuseError(f"{file}: line {exc.lineno}: not valid JSON ({exc.msg}); fix: repair the file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise MoeUnfuseError(f"{file}: model_type: missing; fix: a transformers config.json names its model_type")
    from transformers import CONFIG_MAPPING, __version__

    if raw["model_type"] not in CONFIG_MAPPING:
        raise MoeUnfuseError(
            f"{file}: model_type: {raw['model_type']!r} is unknown to transformers {__version__}; fix: upgrade transformers (remote-code models are not supported)"
        )
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise MoeUnfuseError(
            f"{file}: transformers rejects this config ({first_line(exc)}); fix: check the fields it names"
        ) from None


def build_meta_model(config: Any) -> nn.Module:
    """The model for ``config`` with every tensor on the meta device: its ``architectures`` class if
    transformers has it, else the first auto class (causal LM, image-text-to-text, base) that accepts it."""
    import transformers

    named = transformers_class(getattr(config, "architectures", None) or [], getattr(config, "model_type", None))
    candidates: list[Any] = [named] if named is not None else []
    candidates += [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText, transformers.AutoModel]
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        except ValueError as exc:  # an auto class that does not map this config
            errors.append(f"{cls.__name__}: {first_line(exc)}")
        except Exception as exc:  # noqa: BLE001 - construction failures become one line
            raise MoeUnfuseError(
                f"building {cls.__name__} on the meta device failed ({type(exc).__name__}: {first_line(exc)}); fix: check the config against transformers {transformers.__version__}"
            ) from None
    raise MoeUnfuseError(
        f"no transformers model class accepts {type(config).__name__} ({'; '.join(errors)}); fix: set architectures in config.json"
    )


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class Group:
    """Tensors whose names differ only in their numbers (``layers.*.experts.*.gate_proj``)."""

    pattern: str
    count: int = 0
    numel: int = 0
    detail: str = ""


@dataclass
class FormatPlan:
    """What one format quantizes and excludes, and the checkpoint size it gives."""

    qformat: str
    bytes: float
    quantized: list[Group] = field(default_factory=list)
    excluded: list[Group] = field(default_factory=list)

    @property
    def quantized_numel(self) -> int:
        return sum(g.numel for g in self.quantized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "qformat": self.qformat,
            "bytes": round(self.bytes),
            "gb": round(self.bytes / GB, 3),
            "quantized_params": self.quantized_numel,
            "quantized": [vars(g) for g in self.quantized],
            "excluded": [vars(g) for g in self.excluded],
        }


@dataclass
class AuditReport:
    source: str
    model_class: str
    model_type: str
    dtype: str
    build_seconds: float
    fused: list[FusedParam]
    problems: list[str]
    categories: dict[str, list[int]]  # category -> [tensors, params]
    tied: list[str]
    plans: dict[str, FormatPlan]
    qformat: str

    @property
    def uncovered(self) -> list[FusedParam]:
        return [f for f in self.fused if not f.covered]

    @property
    def ok(self) -> bool:
        """No fused expert parameter would be skipped silently."""
        return not self.uncovered and not self.problems

    @property
    def total(self) -> int:
        return sum(n for _, n in self.categories.values())

    @property
    def language(self) -> int:
        """Parameters outside the vision/audio towers (the model the experts belong to)."""
        return self.total - self.categories["vision_audio"][1]

    def share(self, category: str, of: str = "all") -> float:
        whole = self.total if of == "all" else self.language
        return self.categories[category][1] / whole if whole else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "ok": self.ok,
            "build_seconds": round(self.build_seconds, 2),
            "fused_expert_params": [
                {"param": f.path, "shape": list(f.shape), "arch": f.spec.arch if f.spec else None} for f in self.fused
            ],
            "uncovered": [f.path for f in self.uncovered],
            "problems": self.problems,
            "categories": {
                k: {"tensors": t, "params": n, "bf16_bytes": 2 * n} for k, (t, n) in self.categories.items()
            },
            "total_params": self.total,
            "language_params": self.language,
            "experts_share": {
                "all": round(self.share("experts"), 4),
                "language": round(self.share("experts", "language"), 4),
            },
            "tied": self.tied,
            "qformat": self.qformat,
            "formats": {name: plan.to_dict() for name, plan in self.plans.items()},
        }

    def __str__(self) -> str:
        return "\n".join(_render(self))


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


@dataclass(frozen=True)
class _Target:
    """A weight a quantizer would see after unfusing: a Linear/Conv weight, or one expert's projection."""

    name: str
    shape: tuple[int, ...]
    classes: frozenset[str]


def audit_model(
    model: nn.Module,
    qformat: str = "nvfp4",
    specs: Iterable[Spec] | None = None,
    source: str = "",
    build_seconds: float = 0.0,
) -> AuditReport:
    """Audit an already built (typically meta-device) model; see :func:`audit`."""

    formats = list(dict.fromkeys([*SIZE_FORMATS, qformat]))
    rules = {
        f: QuantRules((*preset_rules(f), *disable_entries())) for f in formats if f != "bf16"
    }  # quantize's own policy
    fused = find_fused_params(model, specs)
    problems: list[str] = []
    targets: list[_Target] = []
    misfits: list[FusedParam] = []  # covered by a spec that does not fit the module
    tried: set[str] = set()
    for f in fused:
        if not f.covered or f.target_path in tried:
            continue
        tried.add(f.target_path)
        try:
            plan = build_plan(f.target, f.spec, f.target_path)  # exactly what unfuse would do, on meta views
        except SpecError as exc:
            problems.append(str(exc))
            misfits += [g for g in fused if g.target_path == f.target_path]
            continue
        prefix = f"{f.target_path}." if f.target_path else ""
        for e, projections in enumerate(plan.experts):
            targets += [
                _Target(f"{prefix}{e}.{proj}", tuple(w.shape), frozenset({"Linear", "Module"}))
                for proj, (w, _) in projections.items()
            ]

    fused_paths = {f.path for f in fused}
    categories = {k: [0, 0] for k in CATEGORIES}
    seen: dict[int, str] = {}
    tied: list[str] = []
    for path, module in model.named_modules():
        parts = path.split(".") if path else []
        for name, p in module._parameters.items():
            if p is None:
                continue
            full = f"{path}.{name}" if path else name
            if id(p) in seen:
                tied.append(f"{full} -> {seen[id(p)]}")
                continue
            seen[id(p)] = full
            cat = _category(parts, module, full in fused_paths)
            categories[cat][0] += 1
            categories[cat][1] += p.numel()
        if (
            isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            and module.weight is not None
            and id(module.weight) in seen
            and seen[id(module.weight)] == f"{path}.weight"
        ):
            targets.append(
                _Target(path, tuple(module.weight.shape), frozenset(c.__name__ for c in type(module).__mro__))
            )

    bf16 = 2.0 * sum(n for _, n in categories.values())
    plans = {"bf16": FormatPlan("bf16", bf16, excluded=_groups((t.name, math.prod(t.shape), "bf16") for t in targets))}
    for fmt, rule in rules.items():
        plans[fmt] = _plan(fmt, rule, targets, bf16)
    stay_fused = [(f.path, math.prod(f.shape), "no spec: stays fused") for f in fused if not f.covered]
    stay_fused += [(f.path, math.prod(f.shape), "spec does not fit: stays fused") for f in misfits]
    for plan in plans.values():  # no quantizer sees a fused expert tensor
        plan.excluded += _groups(stay_fused)
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    return AuditReport(
        source=source or type(model).__name__,
        model_class=type(model).__name__,
        model_type=getattr(getattr(model, "config", None), "model_type", "") or "",
        dtype=str(dtype).replace("torch.", "") if dtype else "unset",
        build_seconds=build_seconds,
        fused=fused,
        problems=problems,
        categories=categories,
        tied=tied,
        plans=plans,
        qformat=qformat,
    )


def _plan(fmt: str, rules: QuantRules, targets: list[_Target], bf16: float) -> FormatPlan:
    total = bf16
    quantized: list[tuple[str, int, str]] = []
    excluded: list[tuple[str, int, str]] = []
    decided: dict[tuple[str, frozenset[str]], tuple[bool, Any, str, bool]] = {}
    for t in targets:
        key = (_pattern(t.name) if rules.digit_blind else t.name, t.classes)
        if key not in decided:
            w_on, w_cfg, reason = rules.state(f"{t.name}.weight_quantizer", set(t.classes))
            i_on, _, _ = rules.state(f"{t.name}.input_quantizer", set(t.classes))
            decided[key] = (w_on, w_cfg, reason, i_on)
        w_on, w_cfg, reason, i_on = decided[key]
        numel = math.prod(t.shape)
        if not w_on:
            excluded.append(
                (t.name, numel, f"excluded by {reason!r}" if reason != "*" else "not selected by the preset")
            )
            continue
        numerics = Numerics.from_cfg(w_cfg)
        total += numerics.weight_bytes(t.shape) + (4 if i_on else 0) - 2 * numel
        quantized.append((t.name, numel, numerics.describe()))
    return FormatPlan(fmt, total, _groups(quantized), _groups(excluded))


def _groups(items: Iterable[tuple[str, int, str]]) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for name, numel, detail in items:
        pattern = _pattern(name)
        g = groups.setdefault((pattern, detail), Group(pattern, detail=detail))
        g.count += 1
        g.numel += numel
    return sorted(groups.values(), key=lambda g: -g.numel)


def _category(parts: list[str], module: nn.Module, is_fused_expert: bool) -> str:
    if any(part.startswith(_MULTIMODAL) for part in parts):
        return "vision_audio"
    if is_fused_expert or "experts" in parts:
        return "experts"
    if "lm_head" in parts:
        return "lm_head"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if any(part in _ROUTER for part in parts):
        return "router"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(part in _DENSE_MLP for part in parts):
        return "dense_mlp"
    return "other"


def audit(path: str | Path, qformat: str = "nvfp4", specs: Iterable[Spec] | None = None) -> AuditReport:
    """Audit the model a folder or ``config.json`` describes, built on the meta device (no weights)."""
    if qformat != "bf16":
        preset_rules(qformat)  # fail on a bad name before building anything
    config = load_config(path)
    start = time.perf_counter()
    model = build_meta_model(config)
    return audit_model(model, qformat, specs, source=str(path), build_seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# text rendering


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _render(r: AuditReport) -> list[str]:
    lines = [
        f"audit {r.source}: {r.model_class} (model_type {r.model_type}, dtype {r.dtype}), built on the meta device in {r.build_seconds:.1f} s",
        "",
    ]
    if r.fused:
        state = "all covered" if not r.uncovered else f"{len(r.uncovered)} NOT covered"
        lines.append(f"fused expert parameters: {len(r.fused)}, {state}")
        groups: dict[tuple, int] = {}
        for f in r.fused:
            key = (_pattern(f.module_path), f.name, f.shape, f.spec.arch if f.spec else "-- none --")
            groups[key] = groups.get(key, 0) + 1
        lines.append(f"  {'module':46} {'parameter':16} {'shape':22} {'count':>5}  spec")
        for (mod, name, shape, arch), n in groups.items():
            lines.append(f"  {mod:46} {name:16} {str(list(shape)):22} {n:>5}  {arch}")
    else:
        lines.append("fused expert parameters: none")
    for p in r.problems:
        lines.append(f"  spec does not fit: {p}")
    big = r.plans["bf16"].bytes >= GB
    unit, binary = (GB, GIB) if big else (1e6, 2**20)
    lines += ["", "parameters by category (unique tensors; tied weights counted once)"]
    lines.append(f"  {'category':14} {'tensors':>8} {'params':>12} {'share':>7} {'bf16 GB' if big else 'bf16 MB':>9}")
    for key, label in CATEGORIES.items():
        t, n = r.categories[key]
        if t:
            lines.append(f"  {label:14} {t:>8} {_b(n):>12} {n / r.total:>7.1%} {2 * n / unit:>9.2f}")
    lines.append(
        f"  {'total':14} {sum(t for t, _ in r.categories.values()):>8} {_b(r.total):>12} {'':>7} {2 * r.total / unit:>9.2f}"
    )
    lines.append(
        f"  experts: {r.share('experts'):.1%} of all parameters, {r.share('experts', 'language'):.1%} of the language model (all but vision/audio)"
    )
    for t in r.tied:
        lines.append(f"  tied: {t}")
    plan = r.plans[r.qformat]
    how = (
        "nothing quantized"
        if r.qformat == "bf16"
        else f"modelopt preset, after unfusing: quantizes {_b(plan.quantized_numel)} parameters"
    )
    lines += ["", f"qformat {r.qformat} ({how})"]
    for g in plan.quantized:
        lines.append(f"  + {g.pattern:62} x{g.count:<6} {_b(g.numel):>10}  {g.detail}")
    lines.append("  excluded (stored bf16):")
    for g in plan.excluded:
        lines.append(f"  - {g.pattern:62} x{g.count:<6} {_b(g.numel):>10}  {g.detail}")
    lines.append("  not quantizable (embeddings, norms, router scales, ...): stored bf16")
    lines += ["", "estimated checkpoint size (unquantized tensors bf16; scales included)"]
    lines.append(f"  {'format':20} {'GB' if big else 'MB':>8} {'GiB' if big else 'MiB':>8} {'vs bf16':>8}")
    for name, p in r.plans.items():
        lines.append(
            f"  {name:20} {p.bytes / unit:>8.2f} {p.bytes / binary:>8.2f} {p.bytes / r.plans['bf16'].bytes:>8.2f}"
        )
    lines.append("")
    if r.uncovered:
        lines.append(
            f"FAIL: {len(r.uncovered)} fused expert parameter(s) no spec covers; a quantizer would skip them silently: {', '.join(f.path for f in r.uncovered[:4])}{' ...' if len(r.uncovered) > 4 else ''}"
        )
        lines.append("      fix: add a spec (moe-unfuse draft CLASS drafts one), then moe-unfuse check SPEC.yaml")
    elif r.problems:
        lines.append("FAIL: a spec matches but does not fit its module (see above)")
    else:
        lines.append("OK: every fused expert parameter is covered by a spec")
    return lines
