"""The export contract: invariants every exported MoE checkpoint must hold, checked from the files.

``verify_checkpoint(path, engine=...)`` reads only safetensors headers and the few small tensors it
needs (scales), so it runs on a 50 GB checkpoint in seconds. Checks, each failing with the keys:

- ``no-fused-experts``: no 3-D (or higher) expert tensor, unless its module is left unquantized
  and listed in ``exclude_modules`` (a ``--refuse-unquantized`` export), or nothing is quantized;
- ``experts-complete``: every experts module has experts ``0..E-1`` (E from ``moe_unfuse.json`` or
  config.json), each with every projection's ``weight`` and, when quantized, its scales
  (``weight_scale``; ``input_scale`` unless weight-only; ``weight_scale_2`` for NVFP4);
- ``gate-up-global-scale``: gate and up of each expert share ``weight_scale_2`` (engines fuse them
  into one w13 with one global scale; a mismatch gave garbage output in vLLM);
- ``input-scales``: every ``input_scale`` is finite and > 0 (a zero one produced NaN in vLLM);
- ``unquantized-excluded``: routers, vision/audio towers, embed_vision/audio, projectors, lm_head and
  unquantized experts carry no scales and are listed in ``exclude_modules`` under their final names;
- ``quant-config``: ``hf_quant_config.json`` and config.json's ``quantization_config`` agree;
- ``engine-names``: every expert key and exclude entry is already in the engine's naming (the
  spec's ``export.renames`` leave it unchanged) and no path segment is doubled (``.moe.moe.``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import MoeUnfuseError
from .export import (
    EXPERT_KEY_RE,
    FUSED_EXPERT_KEY_RE,
    KEEP_UNQUANTIZED_RE,
    METADATA_FILE,
    SCALE_SUFFIXES,
    engine_renames,
    excluded,
    must_exclude,
    rename_key,
    rename_module,
    shard_files,
)
from .spec import Spec

DOUBLED_RE = re.compile(r"(?:^|\.)([A-Za-z_][A-Za-z0-9_]*)\.\1\.experts\.\d+(?:\.|$)")
GATE_UP_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SHOW = 8


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    keys: list[str] = field(default_factory=list)

    def line(self) -> str:
        shown = ", ".join(self.keys[:SHOW]) + (f" (+{len(self.keys) - SHOW} more)" if len(self.keys) > SHOW else "")
        return f"{self.name}: {self.detail}" + (f": {shown}" if shown else "")


class CheckpointContractError(MoeUnfuseError):
    """An exported checkpoint violates the export contract (see :mod:`moe_unfuse.verify`)."""

    def __init__(self, report: "VerifyReport"):
        self.report = report
        failed = "; ".join(c.line() for c in report.checks if not c.ok)
        super().__init__(f"{report.path}: export contract violated: {failed}; fix: re-export with moe-unfuse quantize (see README)")


@dataclass
class VerifyReport:
    path: Path
    engine: str
    quant_algo: str | None
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        what = f"{self.quant_algo or 'unquantized'}, engine {self.engine}"
        if self.ok:
            return f"ok: {len(self.checks)} checks passed ({what}: {', '.join(c.name for c in self.checks)})"
        return f"FAILED {len(self.failed)} of {len(self.checks)} checks ({what})"

    def problem_lines(self) -> list[str]:
        return [c.line() for c in self.failed]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "engine": self.engine, "quant_algo": self.quant_algo, "ok": self.ok, "checks": [vars(c) for c in self.checks]}

    def raise_for_errors(self) -> "VerifyReport":
        if not self.ok:
            raise CheckpointContractError(self)
        return self

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.summary()}"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.line()}")
        return "\n".join(lines)


class _Checkpoint:
    """Keys, shapes and dtypes of every tensor (headers only); tensors on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.files, _ = shard_files(path)
        self.where: dict[str, Path] = {}
        self.shape: dict[str, list[int]] = {}
        self.dtype: dict[str, str] = {}
        for f in self.files:
            with safe_open(f, "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    self.where[k], self.shape[k], self.dtype[k] = f, list(sl.get_shape()), sl.get_dtype()

    def tensor(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(self.where[key], "pt") as fh:
            return fh.get_tensor(key)

    def json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None


def _num_experts(config: dict | None) -> int | None:
    if not config:
        return None
    for cfg in (config, config.get("text_config") or {}):
        for k in NUM_EXPERTS_KEYS:
            if isinstance(cfg.get(k), int):
                return cfg[k]
    return None


def _infer_specs(ckpt: _Checkpoint) -> list[Spec]:
    """Specs matching the model config.json describes, built on the meta device (no weights)."""
    import torch
    import transformers

    from .quantize import matching_specs

    archs = (ckpt.json("config.json") or {}).get("architectures") or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        return []
    try:
        config = transformers.AutoConfig.from_pretrained(ckpt.path, local_files_only=True)
        config.quantization_config = None
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception:  # an unbuildable config only costs the inference, the other checks still run
        return []
    return matching_specs(model)


def _specs_for(ckpt: _Checkpoint, arch: Any, metadata: dict | None) -> tuple[list[Spec], list[tuple[re.Pattern, str]] | None, str]:
    """(specs, stored renames when no spec resolves, where they came from)."""
    from .plugins import registry

    reg = registry()
    if arch is not None:
        items = [arch] if isinstance(arch, (str, Spec)) else list(arch)
        return [a if isinstance(a, Spec) else reg.spec(a) for a in items], None, "arch"
    if metadata and metadata.get("specs"):
        known = reg.specs()
        specs = [known[s["arch"]] for s in metadata["specs"] if s.get("arch") in known]
        if len(specs) == len(metadata["specs"]):
            return specs, None, METADATA_FILE
        return [], [], METADATA_FILE  # renames resolved from the stored copies below
    return _infer_specs(ckpt), None, "config.json"


def _stored_renames(metadata: dict, engine: str) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(r["match"]), r["replace"]) for s in metadata.get("specs", []) for r in s.get("renames", []) if r.get("engine") in (engine, "*", None)]


def verify_checkpoint(path: Path | str, engine: str | None = None, arch: str | Spec | Iterable[str | Spec] | None = None, raise_on_error: bool = False) -> VerifyReport:
    """Check the export contract on the checkpoint folder ``path`` (see the module docstring).

    ``engine``: whose naming to check (default: the one ``moe_unfuse.json`` records, else ``vllm``).
    ``arch``: the spec(s) whose renames define that naming (default: from ``moe_unfuse.json``, else
    inferred from config.json). ``raise_on_error`` raises :class:`CheckpointContractError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise MoeUnfuseError(f"{path}: not a folder; fix: pass the checkpoint folder (with config.json and *.safetensors)")
    ckpt = _Checkpoint(path)
    metadata = ckpt.json(METADATA_FILE)
    engine = engine or (metadata or {}).get("engine") or "vllm"
    hf_quant = ckpt.json("hf_quant_config.json")
    config = ckpt.json("config.json")
    quant = (hf_quant or {}).get("quantization", {})
    algo = quant.get("quant_algo")
    qc = (config or {}).get("quantization_config")
    if algo is None and isinstance(qc, dict):
        algo = qc.get("quant_algo")
    excludes: list[str] = list(quant.get("exclude_modules") or (qc or {}).get("ignore") or [])
    quantized = algo is not None

    specs, stored, _ = _specs_for(ckpt, arch, metadata)
    renames = engine_renames(specs, engine) if stored is None else _stored_renames(metadata or {}, engine)

    keys = list(ckpt.where)
    per_expert = {k: m for k in keys if (m := EXPERT_KEY_RE.match(k))}
    module_of = {k: k.rsplit(".", 1)[0] for k in keys}

    checks = [
        _check_no_fused(ckpt, keys, per_expert, excludes, quantized),
        _check_complete(ckpt, per_expert, metadata, config, excludes, quantized, algo),
        _check_gate_up(ckpt, per_expert, algo),
        _check_input_scales(ckpt, keys),
        _check_excluded(ckpt, keys, module_of, excludes, quantized),
        _check_quant_config(hf_quant, qc, quantized),
        _check_names(keys, per_expert, excludes, renames, engine, metadata),
    ]
    report = VerifyReport(path, engine, algo, checks)
    return report.raise_for_errors() if raise_on_error else report


def _check_no_fused(ckpt: _Checkpoint, keys: list[str], per_expert: dict, excludes: list[str], quantized: bool) -> Check:
    bad = []
    fused = [k for k in keys if len(ckpt.shape[k]) >= 3 and k not in per_expert and FUSED_EXPERT_KEY_RE.search(k)]
    for k in fused:
        module = k.rsplit(".", 1)[0]
        if quantized and not excluded(module, excludes):
            bad.append(f"{k} {ckpt.shape[k]}")
    detail = "fused 3-D expert tensors in a quantized checkpoint, not excluded (a quantizer skipped them)" if bad else f"none quantized-and-fused ({len(fused)} fused tensor(s) left unquantized and excluded)" if fused else "none"
    return Check("no-fused-experts", not bad, detail, bad)


def _required_scales(algo: str | None) -> tuple[str, ...]:
    if algo is None:
        return ()
    a = algo.upper()
    weight_only = "W4A16" in a or "WEIGHT_ONLY" in a or a.startswith("INT4_AWQ") or a == "W4A16_AWQ"
    scales = ["weight_scale"] + ([] if weight_only else ["input_scale"])
    if "NVFP4" in a:
        scales.append("weight_scale_2")
    return tuple(scales)


def _check_complete(ckpt: _Checkpoint, per_expert: dict, metadata: dict | None, config: dict | None, excludes: list[str], quantized: bool, algo: str | None) -> Check:
    layers: dict[str, dict[int, dict[str, set[str]]]] = {}
    for k, m in per_expert.items():
        layers.setdefault(m["prefix"], {}).setdefault(int(m["expert"]), {}).setdefault(m["proj"], set()).add(m["suffix"])
    expected_meta = (metadata or {}).get("experts") or {}
    default_n = _num_experts(config)
    bad: list[str] = []
    for prefix, info in expected_meta.items():
        if info.get("fused"):
            if not any(k.startswith(prefix + ".") and len(ckpt.shape[k]) >= 3 for k in ckpt.where):
                bad.append(f"{prefix} (fused tensors missing)")
        elif prefix not in layers:
            bad.append(f"{prefix} (no per-expert keys)")
    required = _required_scales(algo)
    for prefix, experts in layers.items():
        meta = expected_meta.get(prefix, {})
        n = meta.get("experts") or default_n or (max(experts) + 1)
        projections = set(meta.get("projections") or {p for e in experts.values() for p in e})
        for e in range(n):
            if e not in experts:
                bad.append(f"{prefix}.{e} (missing)")
                continue
            for proj in sorted(projections):
                have = experts[e].get(proj, set())
                module = f"{prefix}.{e}.{proj}"
                if "weight" not in have:
                    bad.append(f"{module}.weight")
                    continue
                if quantized and not excluded(module, excludes):
                    bad.extend(f"{module}.{s}" for s in required if s not in have)
        extra = sorted(e for e in experts if e >= n)
        bad.extend(f"{prefix}.{e} (beyond num_experts {n})" for e in extra)
    n_layers = len(layers) + sum(1 for i in expected_meta.values() if i.get("fused"))
    detail = f"missing expert tensors (required per projection: weight{', ' + ', '.join(required) if required else ''})" if bad else f"{n_layers} experts module(s), every expert has weight{' and ' + ', '.join(required) if required else ''}"
    return Check("experts-complete", not bad, detail, bad)


def _check_gate_up(ckpt: _Checkpoint, per_expert: dict, algo: str | None) -> Check:
    import torch

    keys = set(per_expert)
    bad, pairs = [], 0
    for k, m in per_expert.items():
        if m["suffix"] != "weight_scale_2":
            continue
        for gate, up in GATE_UP_PAIRS:
            if m["proj"] != gate:
                continue
            other = f"{m['prefix']}.{m['expert']}.{up}.weight_scale_2"
            if other not in keys:
                bad.append(f"{other} (missing, gate has one)")
                continue
            pairs += 1
            a, b = ckpt.tensor(k), ckpt.tensor(other)
            if a.shape != b.shape or not torch.equal(a, b):
                bad.append(f"{m['prefix']}.{m['expert']} ({gate} {a.flatten()[0].item():.6g} != {up} {b.flatten()[0].item():.6g})")
    detail = "gate and up weight_scale_2 differ" if bad else f"{pairs} expert(s) share one weight_scale_2" if pairs else "no NVFP4 global scales"
    return Check("gate-up-global-scale", not bad, detail, bad)


def _check_input_scales(ckpt: _Checkpoint, keys: list[str]) -> Check:
    import torch

    bad, n = [], 0
    for k in keys:
        if not k.endswith("input_scale"):
            continue
        n += 1
        t = ckpt.tensor(k).float()
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            v = t.flatten()[0].item() if t.numel() else "empty"
            bad.append(f"{k}={v}")
    detail = "input_scale not finite and > 0" if bad else f"{n} input_scale(s), all finite and > 0"
    return Check("input-scales", not bad, detail, bad)


def _check_excluded(ckpt: _Checkpoint, keys: list[str], module_of: dict, excludes: list[str], quantized: bool) -> Check:
    if not quantized:
        return Check("unquantized-excluded", True, "checkpoint is unquantized (nothing to exclude)")
    keyset = set(keys)
    bad = [f"{m} (unquantized, not in exclude_modules)" for m in sorted(must_exclude(keys)) if not excluded(m, excludes)]
    quantized_sensitive = sorted({module_of[k] for k in keys if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES and KEEP_UNQUANTIZED_RE.search(module_of[k])})
    bad.extend(f"{m} (quantized; must stay unquantized)" for m in quantized_sensitive)
    bad.extend(f"{m}.weight dtype {ckpt.dtype[m + '.weight']} (excluded, yet not a float type)" for m in sorted(must_exclude(keys)) if f"{m}.weight" in keyset and not ckpt.dtype[m + ".weight"].startswith(("BF", "F16", "F32", "F64")))
    if not excluded("lm_head", excludes):
        bad.append("lm_head (not in exclude_modules)")
    n = len(must_exclude(keys))
    detail = "modules that must stay unquantized and be excluded" if bad else f"{n} unquantized router/tower/projector/expert module(s) and lm_head excluded"
    return Check("unquantized-excluded", not bad, detail, bad)


def _check_quant_config(hf_quant: dict | None, qc: Any, quantized: bool) -> Check:
    if not quantized:
        return Check("quant-config", qc is None, "config.json has a quantization_config but no quant_algo" if qc else "no quantization config (unquantized)")
    bad = []
    if hf_quant is None:
        bad.append("hf_quant_config.json (missing)")
    if not isinstance(qc, dict):
        bad.append("config.json quantization_config (missing)")
    if hf_quant is not None and isinstance(qc, dict):
        q = hf_quant.get("quantization", {})
        if q.get("quant_algo") != qc.get("quant_algo"):
            bad.append(f"quant_algo {q.get('quant_algo')} != {qc.get('quant_algo')}")
        a, b = set(q.get("exclude_modules") or []), set(qc.get("ignore") or qc.get("exclude_modules") or [])
        if a != b:
            bad.extend(f"{n} (only in {'hf_quant_config.json' if n in a else 'config.json'})" for n in sorted(a ^ b))
    return Check("quant-config", not bad, "hf_quant_config.json and config.json disagree" if bad else "hf_quant_config.json and config.json agree", bad)


def _check_names(keys: list[str], per_expert: dict, excludes: list[str], renames: Sequence[tuple[re.Pattern, str]], engine: str, metadata: dict | None) -> Check:
    bad = []
    for prefix, info in ((metadata or {}).get("experts") or {}).items():
        # The module each experts prefix came from, renamed for this engine, must be that prefix
        # (catches an export made for another engine, which the fixed-point test below cannot see).
        expected = info["module"] if info.get("fused") else rename_module(f"{info['module']}.0", renames)[: -len(".0")]
        if expected != prefix:
            bad.append(f"{prefix} ({engine} names it {expected})")
    for k in per_expert:
        if DOUBLED_RE.search(k):
            bad.append(f"{k} (doubled segment)")
        elif (new := rename_key(k, renames)) != k:
            bad.append(f"{k} (expected {new})")
    for n in excludes:
        if DOUBLED_RE.search(n + "."):
            bad.append(f"exclude {n} (doubled segment)")
        elif (new := rename_module(n, renames)) != n:
            bad.append(f"exclude {n} (expected {new})")
    rules = "; ".join(f"{p.pattern} -> {r}" for p, r in renames) or "no renames"
    detail = f"not in {engine} naming ({rules})" if bad else f"{len(per_expert)} expert keys in {engine} naming ({rules})"
    return Check("engine-names", not bad, detail, bad)
