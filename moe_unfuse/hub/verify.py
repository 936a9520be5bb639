"""The export contract: invariants every exported MoE checkpoint must hold, checked from the files.

``verify_checkpoint(path, engine=...)`` reads only safetensors headers and the small tensors it needs
(scales), and builds the model config.json describes on the meta device for the naming contract
(:mod:`moe_unfuse.hub.naming`), so it runs on a 50 GB checkpoint in seconds. Checks, each failing with
the offending keys:

- ``hub-names``: every tensor is a name ``save_pretrained`` writes for the unquantized model (fused
  experts expanded per the spec's export layout) or a quantization scale of one, or a source tensor the
  model places nowhere that ``moe_unfuse.json`` lists as carried (``carried_from_source``; never with a
  scale); every such name is present; shapes and dtypes fit the format (NVFP4 packs two weights a byte, FP8 one);
- ``shards``: a sharded checkpoint's index lists exactly the tensors its files hold, inside the folder;
- ``no-fused-experts``: no fused 3-D expert tensor is left in a quantized checkpoint unless the spec
  exports that module fused, or it is unquantized and excluded; never fused and per-expert weights of
  one module together;
- ``experts-complete``: every expert of every experts module has each projection's weight and, when
  quantized, its scales (``weight_scale``; ``input_scale`` unless weight-only; NVFP4 ``weight_scale_2``);
- ``gate-up-global-scale``: gate and up of each expert share ``weight_scale_2``;
- ``scales``: every ``input_scale`` and ``weight_scale_2`` is finite and > 0, every ``weight_scale``
  finite and >= 0 (> 0 when per tensor);
- ``unquantized-excluded``: routers, towers, projectors, lm_head and unquantized experts carry no scales
  and are excluded; no quantized module is excluded;
- ``quant-config``: quantized tensors come with a quantization config, and ``hf_quant_config.json``
  and config.json's ``quantization_config`` agree;
- one check per rule of :data:`ENGINE_RULES` for ``engine``: what that engine's loader reads, each
  rule citing the loader source and versions it was read from (``../shared/reference/engine_contracts.md``).

Unreadable input (a missing or corrupt file, invalid JSON) raises a one-line :class:`MoeUnfuseError`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..base.errors import MoeUnfuseError, first_line
from ..base.options import ENGINES
from ..spec.catalog import get_spec, select_specs, specs_for
from ..spec.catalog import specs as catalog_specs
from ..spec.model import Spec
from .checkpoint import METADATA_FILE, SCALE_SUFFIXES, excluded, fused_scale_base, must_exclude, quantized_modules
from .checkpoint_input import (
    QuantMetadata,
    check_config_bounds,
    check_metadata_engine,
    check_weight_map,
    parameter_budget,
    read_quant_metadata,
)
from .naming import KV_SUFFIXES, QUANT_SUFFIXES, NamingContract, build_contract, meta_model_from_config
from .policy import KEEP_UNQUANTIZED_RE

PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z0-9_]+)$"
)
GATE_UP_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
SHOW = 8
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
#: Scale dtypes per format (False: FP8, True: NVFP4), as modelopt writes and the engines read them.
_SCALE_DTYPES = {
    False: {"weight_scale": "F32", "input_scale": "F32"},
    True: {"weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"},
}


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
    """An exported checkpoint violates the export contract (see :mod:`moe_unfuse.hub.verify`)."""

    def __init__(self, report: "VerifyReport"):
        self.report = report
        failed = "; ".join(c.line() for c in report.checks if not c.ok)
        super().__init__(
            f"{report.path}: export contract violated: {failed}; fix: re-export with moe-unfuse quantize (see README)"
        )


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
        return {
            "path": str(self.path),
            "engine": self.engine,
            "quant_algo": self.quant_algo,
            "ok": self.ok,
            "checks": [vars(c) for c in self.checks],
        }

    def raise_for_errors(self) -> "VerifyReport":
        if not self.ok:
            raise CheckpointContractError(self)
        return self

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.summary()}"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.line()}")
        return "\n".join(lines)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MoeUnfuseError(f"{path}: not valid JSON ({first_line(exc, 80)}); fix: re-export the checkpoint") from None


class Checkpoint:
    """Keys, shapes and dtypes of every tensor (headers only), tensors on demand, and the index's faults."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.where: dict[str, Path] = {}
        self.shape: dict[str, list[int]] = {}
        self.dtype: dict[str, str] = {}
        self.index_problems: list[str] = []
        index = _read_json(path / "model.safetensors.index.json")
        if index is not None:
            weight_map = check_weight_map(f"{path}/model.safetensors.index.json", index)
            names = set(weight_map.values())
            for name in sorted(names):
                if Path(name).name != name:
                    self.index_problems.append(f"{name} (shard outside the folder)")
            files = sorted(path / n for n in names if Path(n).name == n)
        else:
            weight_map = None
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MoeUnfuseError(
                f"{path}: no *.safetensors files; fix: point at a checkpoint folder written by save_pretrained/export"
            )
        for f in files:
            if not f.is_file():
                raise MoeUnfuseError(f"{f}: shard named in the index is missing; fix: copy the whole checkpoint folder")
            try:
                with safe_open(f, "pt") as fh:
                    for k in fh.keys():
                        if k in self.where:
                            self.index_problems.append(f"{k} (in {self.where[k].name} and {f.name})")
                        sl = fh.get_slice(k)
                        self.where[k], self.shape[k], self.dtype[k] = f, list(sl.get_shape()), sl.get_dtype()
            except MoeUnfuseError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a corrupt file
                raise MoeUnfuseError(
                    f"{f}: not a readable safetensors file ({first_line(exc, 80)}); fix: re-export the checkpoint"
                ) from None
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.where:
                    self.index_problems.append(f"{k} (in the index, in no shard)")
                elif self.where[k].name != fname:
                    self.index_problems.append(f"{k} (index says {fname}, found in {self.where[k].name})")
            self.index_problems.extend(
                f"{k} (in {self.where[k].name}, not in the index)" for k in self.where if k not in weight_map
            )

    def tensor(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(self.where[key], "pt") as fh:
            return fh.get_tensor(key)

    def json(self, name: str) -> Any:
        return _read_json(self.path / name)


# ----------------------------------------------------------------------------------------------
# the engines' loaders, as data


@dataclass(frozen=True)
class Context:
    """What an engine rule looks at."""

    ckpt: Checkpoint
    contract: NamingContract | None
    metadata: dict
    hf_quant: dict | None
    qc: dict | None
    algo: str | None
    excludes: list[str]


@dataclass(frozen=True)
class EngineRule:
    """One thing an engine's loader requires of a checkpoint, with where it was read."""

    name: str
    engines: tuple[str, ...]
    versions: str
    source: str
    what: str
    check: Callable[[Context], list[str]]


def _per_expert_input_scales_not_0d(ctx: Context) -> list[str]:
    return [
        f"{k} shape {ctx.ckpt.shape[k]}"
        for k in ctx.ckpt.where
        if k.endswith(".input_scale") and PER_EXPERT_RE.match(k) and ctx.ckpt.shape[k] != []
    ]


def _exclude_patterns_vllm_cannot_match(ctx: Context) -> list[str]:
    return [f"{p} (write {p[:-2]}*)" for p in ctx.excludes if p.endswith(".*")]


def _vllm_config_fields(ctx: Context) -> list[str]:
    if ctx.algo is None:
        return []
    bad = []
    method = (ctx.qc or {}).get("quant_method", "")
    if not str(method).startswith("modelopt"):
        bad.append(f"config.json quantization_config.quant_method {method!r} (must start with 'modelopt')")
    if not isinstance((ctx.qc or {}).get("ignore"), list):
        bad.append("config.json quantization_config.ignore (missing)")
    if "NVFP4" in ctx.algo.upper():
        q = (ctx.hf_quant or {}).get("quantization", {})
        bad.extend(
            f"hf_quant_config.json quantization.{f} (missing)"
            for f in ("group_size", "kv_cache_quant_algo", "exclude_modules")
            if f not in q
        )
    return bad


def _moe_prefixed_expert_keys(ctx: Context) -> list[str]:
    return sorted(
        k for k in ctx.ckpt.where if ".moe.experts." in k and (ctx.contract is None or ctx.contract.base(k) is None)
    )


def _gpt_oss_not_fused(ctx: Context) -> list[str]:
    return sorted(
        f"{hub} (per-expert keys; vLLM reads only the fused {hub}.gate_up_proj)"
        for hub, e in (ctx.contract.experts if ctx.contract else {}).items()
        if e.arch == "gpt_oss" and any(k.startswith(hub + ".0.") for k in ctx.ckpt.where)
    )


def _engine_cannot_load(engine: str) -> Callable[[Context], list[str]]:
    """Quantized experts, or other quantized modules, of a family whose spec says ``engine``'s own loader
    drops or misreads them, and unquantized modules it builds quantized (``export.engines``, its ``why``
    naming the loader's file:line; for vLLM, seen in its real loader by ``tests_vllm/``)."""

    def check(ctx: Context) -> list[str]:
        scaled = quantized_modules(ctx.ckpt.where)
        experts = ctx.contract.experts if ctx.contract else {}
        bad: dict[str, list[str]] = {}
        for label, e in sorted(experts.items()):
            why = get_spec(e.arch).experts_unquantized_for(engine)
            if why and any(m == e.hub or m.startswith(e.hub + ".") for m in scaled):
                bad.setdefault(why, []).append(label)
        for arch in sorted({e.arch for e in experts.values()}):
            globs, why = get_spec(arch).modules_unquantized_for(engine)
            for m in sorted(scaled):
                if why and any(fnmatch.fnmatch(m, g) for g in globs):
                    bad.setdefault(why, []).append(m)
        heads = [
            f"{m} unquantized ({why}); fix: export with --engine {engine}"
            for m, why in _quantized_for(engine, ctx.contract).items()
            if ctx.algo is not None and m not in scaled and any(k.startswith(m + ".") for k in ctx.ckpt.where)
        ]  # (an unquantized checkpoint gets no quantization config: the engine builds it all unquantized)
        return [
            *(f"{', '.join(hubs)} quantized ({why}); fix: export with --engine {engine}" for why, hubs in bad.items()),
            *heads,
        ]

    return check


#: Each rule names the engine versions whose loader source it was read from.
ENGINE_RULES: tuple[EngineRule, ...] = (
    EngineRule(
        "expert-input-scale-0d",
        ("vllm", "sglang"),
        "vLLM 0.19.1-0.33.0, SGLang 0.5.23",
        "vllm layers/fused_moe/routed_experts.py:332-350 (reshape(()))",
        "every per-expert input_scale is a 0-d scalar",
        _per_expert_input_scales_not_0d,
    ),
    EngineRule(
        "exclude-patterns",
        ("vllm",),
        "vLLM 0.22.1-0.26",
        "vllm model_executor/layers/quantization/modelopt.py:266-285",
        "exclude entries are module names or 'prefix*' (a trailing '.*' never matches the module itself)",
        _exclude_patterns_vllm_cannot_match,
    ),
    EngineRule(
        "quant-config-fields",
        ("vllm", "sglang"),
        "vLLM 0.19.1-0.33.0",
        "vllm weight_utils.py:240-246; modelopt.py:359, :820",
        "quantization_config.quant_method starts with 'modelopt' and lists 'ignore'; NVFP4 needs group_size, kv_cache_quant_algo, exclude_modules",
        _vllm_config_fields,
    ),
    EngineRule(
        "experts-under-decoder-layer",
        ("vllm", "trtllm"),
        "vLLM 0.31.0-0.33.0 (0.19-0.20 double the prefix), TensorRT-LLM gemma4 mapper",
        "vllm models/gemma4.py:646-653, models/utils.py:438-448; tensorrt_llm gemma4_weight_mapper.py (_remap_moe_keys)",
        "no expert key under a '.moe.experts.' prefix the model does not have",
        _moe_prefixed_expert_keys,
    ),
    EngineRule(
        "gpt-oss-fused-experts",
        ("vllm",),
        "vLLM 0.33.0",
        "vllm models/gpt_oss.py:73-82, 1250, 1393",
        "GPT-OSS experts are the fused gate_up_proj/down_proj (per-expert keys are dropped silently)",
        _gpt_oss_not_fused,
    ),
    *(
        EngineRule(
            "engine-loads",
            (engine,),
            "the spec's export.engines.<engine>.versions",
            "the spec's export.engines.<engine>.why",
            "no module quantized, or unquantized, where the family's spec says this engine's loader cannot serve it so",
            _engine_cannot_load(engine),
        )
        for engine in ("vllm", "sglang")
    ),
)


def engine_rules(engine: str) -> list[EngineRule]:
    if engine not in ENGINES:
        raise MoeUnfuseError(f"unknown engine {engine!r}; fix: use one of {', '.join(ENGINES)}")
    return [r for r in ENGINE_RULES if engine in r.engines]


# ----------------------------------------------------------------------------------------------


def _contract(ckpt: Checkpoint, config: Any, arch: Any, metadata: dict) -> tuple[NamingContract | None, str]:
    """The naming contract of the model config.json describes (specs from ``arch``, else the ones
    ``moe_unfuse.json`` records, else every spec matching), or None and why."""
    if not isinstance(config, dict):
        return None, "config.json is missing or not a JSON object"
    check_config_bounds(f"{ckpt.path}/config.json", config, ckpt.shape)
    with parameter_budget(f"{ckpt.path}/config.json", ckpt.shape):
        model = meta_model_from_config(config, str(ckpt.path))
    if model is None:
        return (
            None,
            f"config.json architectures {config.get('architectures')} cannot be built by the installed transformers",
        )
    if arch is not None:
        specs = specs_for(arch)
    elif (
        metadata.get("specs")
        and isinstance(metadata["specs"], list)
        and all(isinstance(s, dict) and s.get("arch") in catalog_specs() for s in metadata["specs"])
    ):
        specs = [get_spec(s["arch"]) for s in metadata["specs"]]
    else:
        specs = select_specs(model)
    return build_contract(model, specs), ""


def verify_checkpoint(
    path: Path | str,
    engine: str | None = None,
    arch: str | Spec | Iterable[str | Spec] | None = None,
    raise_on_error: bool = False,
) -> VerifyReport:
    """Check the export contract on the checkpoint folder ``path`` (see the module docstring).

    ``engine``: whose loader rules to check (default: the one ``moe_unfuse.json`` records, else
    ``vllm``). ``arch``: the spec(s) that define the experts' export layout (default: from
    ``moe_unfuse.json``, else every spec matching config.json's model). ``raise_on_error`` raises
    :class:`CheckpointContractError`.
    """
    path = Path(path)
    if not path.is_dir():
        raise MoeUnfuseError(
            f"{path}: not a folder; fix: pass the checkpoint folder (with config.json and *.safetensors)"
        )
    ckpt = Checkpoint(path)
    metadata = ckpt.json(METADATA_FILE)
    metadata = metadata if isinstance(metadata, dict) else {}
    engine = engine or check_metadata_engine(f"{path}/{METADATA_FILE}", metadata, ENGINES) or "vllm"
    rules = engine_rules(engine)
    config = ckpt.json("config.json")
    meta = read_quant_metadata(str(path), ckpt.json("hf_quant_config.json"), config)
    hf_quant, qc, algo, excludes = meta.hf_quant, meta.qc, meta.algo, meta.excludes
    quantized = algo is not None
    contract, why = _contract(ckpt, config, arch, metadata)
    contract = contract.for_keys(ckpt.where) if contract is not None else None
    # source tensors the model places nowhere, carried as they are (from_source.carry_source_tensors)
    if contract is not None:
        contract.carried = frozenset(c for c in metadata.get("carried_from_source") or () if isinstance(c, str))
    keys = list(ckpt.where)
    ctx = Context(ckpt, contract, metadata, hf_quant, qc, algo, excludes)

    checks = [
        _check_names(ckpt, contract, why, algo),
        Check(
            "shards",
            not ckpt.index_problems,
            "index and shards disagree" if ckpt.index_problems else "index and shards agree",
            ckpt.index_problems,
        ),
        _check_no_fused(ckpt, contract, excludes, quantized),
        _check_complete(ckpt, contract, excludes, algo),
        _check_gate_up(ckpt),
        _check_scales(ckpt, keys),
        _check_excluded(ckpt, keys, excludes, quantized, _quantized_for(engine, contract)),
        _check_quant_config(ckpt, hf_quant, qc, quantized),
        *metadata_checks(ckpt, contract, meta),
    ]
    for rule in rules:
        bad = rule.check(ctx)
        checks.append(
            Check(
                rule.name,
                not bad,
                f"{rule.what} ({engine}: {rule.versions}; {rule.source})" if bad else f"{rule.what}",
                bad,
            )
        )
    report = VerifyReport(path, engine, algo, checks)
    return report.raise_for_errors() if raise_on_error else report


def _nvfp4(algo: str | None) -> bool:
    return algo is not None and "FP4" in algo.upper()


def _check_names(ckpt: Checkpoint, contract: NamingContract | None, why: str, algo: str | None) -> Check:
    if contract is None:
        return Check(
            "hub-names",
            False,
            f"no naming contract: {why}",
            [],
        )
    bad = [f"{k} (not a tensor save_pretrained writes for this model)" for k in contract.unknown(ckpt.where)]
    bad.extend(f"{n} (missing)" for n in contract.missing(ckpt.where))
    for k in ckpt.where:
        base = contract.base(k)
        if base != k or k not in contract.names:
            continue
        want, have, dtype = list(contract.names[k]), ckpt.shape[k], ckpt.dtype[k]
        scaled = (
            any(f"{k[: -len('.weight')]}.{s}" in ckpt.where for s in QUANT_SUFFIXES)
            if k.endswith(".weight")
            else any(f"{k}_{s}" in ckpt.where for s in QUANT_SUFFIXES)
        )
        if not scaled:
            if have != want:
                bad.append(f"{k} shape {have} (expected {want})")
            elif dtype not in FLOAT_DTYPES:
                bad.append(f"{k} dtype {dtype} (unquantized, expected a float type)")
        if scaled:
            scale_key = (
                (lambda x, m=k[: -len(".weight")]: f"{m}.{x}") if k.endswith(".weight") else (lambda x, n=k: f"{n}_{x}")
            )
            # weight scales: every quantized weight (input scales are required of experts, below;
            # modelopt exports some dense linears weight-only, e.g. Jamba's mamba.dt_proj)
            bad.extend(
                f"{scale_key(x)} (missing: {algo} needs it next to a quantized weight)"
                for x in _required_scales(algo)
                if x != "input_scale" and scale_key(x) not in ckpt.where
            )
            for x, want_dtype in _SCALE_DTYPES[_nvfp4(algo)].items():
                if scale_key(x) in ckpt.where and ckpt.dtype[scale_key(x)] != want_dtype:
                    bad.append(f"{scale_key(x)} dtype {ckpt.dtype[scale_key(x)]} (expected {want_dtype})")
        if not scaled:
            pass
        elif _nvfp4(algo):
            halved = (
                len(have) == len(want)
                and sum(a != b for a, b in zip(have, want)) == 1
                and any(2 * a == b for a, b in zip(have, want) if a != b)
            )
            if dtype != "U8" or not halved:
                bad.append(f"{k} {dtype} {have} (NVFP4 packs two per byte: U8 with one dim of {want} halved)")
        elif dtype != "F8_E4M3" or have != want:
            bad.append(f"{k} {dtype} {have} (FP8 expected F8_E4M3 {want})")
    n = len(contract.names)
    return Check(
        "hub-names",
        not bad,
        "tensors that are not the hub checkpoint's names, or do not fit them"
        if bad
        else f"{len(ckpt.where)} tensors, all {n} hub names present, shapes and dtypes fit",
        bad,
    )


def _check_no_fused(ckpt: Checkpoint, contract: NamingContract | None, excludes: list[str], quantized: bool) -> Check:
    bad: list[str] = []
    fused_ok = {
        f"{e.hub}.{name}"
        for e in (contract.experts.values() if contract else ())
        if e.layout == "fused" and not e.fused_back
        for name, _, bias in e.params
        for name in (name, bias)
        if name
    }
    fused = [
        k
        for k in ckpt.where
        if len(ckpt.shape[k]) >= 3 and not PER_EXPERT_RE.match(k) and re.search(r"(^|\.|_)experts?(\.|$)", k)
    ]
    for k in fused:
        module = k.rsplit(".", 1)[0]
        if any(
            key.startswith(module + ".") and PER_EXPERT_RE.match(key) and key.endswith(".weight") for key in ckpt.where
        ):
            bad.append(f"{k} (and per-expert weights of {module})")
        elif quantized and (fused_scale_base(k, ckpt.where) or k) not in fused_ok and not excluded(module, excludes):
            bad.append(f"{k} {ckpt.shape[k]}")
    detail = (
        "fused expert tensors that are neither the spec's fused export nor unquantized and excluded"
        if bad
        else f"{len(fused)} fused expert tensor(s), each declared fused or unquantized and excluded"
        if fused
        else "none"
    )
    return Check("no-fused-experts", not bad, detail, bad)


def _required_scales(algo: str | None) -> tuple[str, ...]:
    if algo is None:
        return ()
    a = algo.upper()
    weight_only = "W4A16" in a or "WEIGHT_ONLY" in a or a.startswith("INT4_AWQ")
    scales = ["weight_scale"] + ([] if weight_only else ["input_scale"])
    if "NVFP4" in a:
        scales.append("weight_scale_2")
    return tuple(scales)


def _check_complete(ckpt: Checkpoint, contract: NamingContract | None, excludes: list[str], algo: str | None) -> Check:
    required = _required_scales(algo)
    bad: list[str] = []
    modules = contract.experts.values() if contract else ()
    for e in modules:
        for name in e.weights:
            if name.endswith(".weight"):
                module, scale_key = name[: -len(".weight")], lambda s, m=name[: -len(".weight")]: f"{m}.{s}"
            else:
                module, scale_key = name.rsplit(".", 1)[0], lambda s, n=name: f"{n}_{s}"
            if name not in ckpt.where:
                bad.append(f"{name} (missing)")
            elif required and not excluded(module, excludes):
                bad.extend(scale_key(s) for s in required if scale_key(s) not in ckpt.where)
    detail = (
        f"missing expert tensors (required per weight: {', '.join(('weight',) + required)})"
        if bad
        else f"{len(list(modules))} experts module(s), every expert weight present"
        + (f" with {', '.join(required)}" if required else "")
    )
    return Check("experts-complete", not bad, detail, bad)


def _check_gate_up(ckpt: Checkpoint) -> Check:
    import torch

    bad, pairs = [], 0
    for k in ckpt.where:
        m = PER_EXPERT_RE.match(k)
        if not m or m["suffix"] != "weight_scale_2":
            continue
        for gate, up in GATE_UP_PAIRS:
            if m["proj"] != gate:
                continue
            other = f"{m['prefix']}.{m['expert']}.{up}.weight_scale_2"
            if other not in ckpt.where:
                bad.append(f"{other} (missing, gate has one)")
                continue
            pairs += 1
            a, b = ckpt.tensor(k), ckpt.tensor(other)
            if a.shape != b.shape or not torch.equal(a, b):
                shown = [f"{t.flatten()[0].item():.6g}" if t.numel() else f"shape {list(t.shape)}" for t in (a, b)]
                bad.append(f"{m['prefix']}.{m['expert']} ({gate} {shown[0]} != {up} {shown[1]})")
    detail = (
        "gate and up weight_scale_2 differ (vLLM and SGLang use gate's for both)"
        if bad
        else f"{pairs} expert(s) share one weight_scale_2"
        if pairs
        else "no per-expert NVFP4 global scales"
    )
    return Check("gate-up-global-scale", not bad, detail, bad)


def _check_scales(ckpt: Checkpoint, keys: list[str]) -> Check:
    import torch

    bad, n = [], 0
    for k in keys:
        kind = next((s for s in ("weight_scale_2", "input_scale", "weight_scale") if k.endswith(s)), None)
        if kind is None:
            continue
        n += 1
        t = ckpt.tensor(k).float()
        per_block = kind == "weight_scale" and t.dim() >= 2
        ok = t.numel() > 0 and bool(torch.isfinite(t).all()) and bool((t >= 0).all() if per_block else (t > 0).all())
        if not ok:
            v = (
                "empty"
                if not t.numel()
                else t.flatten()[(~torch.isfinite(t.flatten()) | (t.flatten() <= 0)).nonzero()[0, 0]].item()
                if not per_block
                else "negative or non-finite block scale"
            )
            bad.append(f"{k}={v}")
    detail = (
        "scales that are not finite and > 0"
        if bad
        else f"{n} scale tensor(s), all finite and > 0 (per-block weight scales >= 0)"
    )
    return Check("scales", not bad, detail, bad)


def _quantized_for(engine: str, contract: NamingContract | None) -> dict[str, str]:
    """Modules kept unquantized by default that ``engine`` builds quantized, per the checkpoint's specs
    (``export.engines.E.quantized``: Exaone-MoE's lm_head in vLLM), and why."""
    out: dict[str, str] = {}
    for arch in sorted({e.arch for e in (contract.experts.values() if contract else ())}):
        names, why = get_spec(arch).modules_quantized_for(engine)
        out.update(dict.fromkeys(names, why or ""))
    return out


def _check_excluded(
    ckpt: Checkpoint, keys: list[str], excludes: list[str], quantized: bool, quantized_ok: Iterable[str] = ()
) -> Check:
    """``quantized_ok``: modules kept unquantized by default that this engine builds quantized."""
    if not quantized:
        return Check("unquantized-excluded", True, "checkpoint is unquantized (nothing to exclude)")
    scaled = sorted(quantized_modules(keys))
    ok = set(quantized_ok)
    bad = [
        f"{m} (unquantized, not in exclude_modules)" for m in sorted(must_exclude(keys)) if not excluded(m, excludes)
    ]
    bad.extend(
        f"{m} (quantized; must stay unquantized)" for m in scaled if KEEP_UNQUANTIZED_RE.search(m) and m not in ok
    )
    bad.extend(
        f"{m} (quantized, yet excluded: an engine loads it as unquantized)"
        for m in scaled
        if excluded(m, excludes) and (not KEEP_UNQUANTIZED_RE.search(m) or m in ok)
    )
    if not excluded("lm_head", excludes) and "lm_head" not in scaled:
        bad.append("lm_head (not in exclude_modules)")
    n = len(must_exclude(keys))
    detail = (
        "modules that must stay unquantized and be excluded, or quantized ones excluded"
        if bad
        else f"{n} unquantized router/tower/projector/expert module(s) and lm_head excluded, no quantized module excluded"
    )
    return Check("unquantized-excluded", not bad, detail, bad)


def _check_quant_config(ckpt: Checkpoint, hf_quant: dict | None, qc: dict | None, quantized: bool) -> Check:
    if not quantized:
        scaled = sorted(
            k for k in ckpt.where if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES or ckpt.dtype[k] in ("F8_E4M3", "U8")
        )
        if scaled:
            return Check(
                "quant-config",
                False,
                "quantized tensors but no quant_algo in hf_quant_config.json or config.json",
                scaled,
            )
        return Check(
            "quant-config",
            qc is None,
            "config.json has a quantization_config but no quant_algo" if qc else "no quantization config (unquantized)",
        )
    bad = []
    if hf_quant is None:
        bad.append("hf_quant_config.json (missing)")
    if qc is None:
        bad.append("config.json quantization_config (missing)")
    if hf_quant is not None and qc is not None:
        q = hf_quant.get("quantization") or {}
        if q.get("quant_algo") != qc.get("quant_algo"):
            bad.append(f"quant_algo {q.get('quant_algo')} != {qc.get('quant_algo')}")
        a, b = set(q.get("exclude_modules") or []), set(qc.get("ignore") or qc.get("exclude_modules") or [])
        if a != b:
            bad.extend(f"{n} (only in {'hf_quant_config.json' if n in a else 'config.json'})" for n in sorted(a ^ b))
    return Check(
        "quant-config",
        not bad,
        "hf_quant_config.json and config.json disagree" if bad else "hf_quant_config.json and config.json agree",
        bad,
    )


# ----------------------------------------------------------------------------------------------
# what the quantization metadata declares against the scale tensors present: each rule is
# something an engine reads without complaint and then computes wrong with


def metadata_checks(ckpt: Checkpoint, contract: NamingContract | None, meta: QuantMetadata) -> list[Check]:
    """kv-cache-scales, input-scales and scale-shapes (see each function)."""
    return [
        _check_kv_cache(ckpt, meta.kv_algo),
        _check_input_scales(ckpt, meta.algo),
        _check_scale_shapes(ckpt, contract, meta),
    ]


def _scalar_problem(ckpt: Checkpoint, key: str) -> str | None:
    """Why ``key`` is not one finite positive float (None when it is)."""
    import torch

    if ckpt.dtype[key] not in FLOAT_DTYPES:
        return f"{key} dtype {ckpt.dtype[key]} (expected a float scalar)"
    if ckpt.shape[key] not in ([], [1]):
        return f"{key} shape {ckpt.shape[key]} (expected one value: an engine would broadcast it)"
    v = ckpt.tensor(key).float().flatten()[0].item()
    return None if torch.isfinite(torch.tensor(v)) and v > 0 else f"{key}={v}"


def _check_kv_cache(ckpt: Checkpoint, kv_algo: str | None) -> Check:
    """kv_cache_quant_algo set: every attention k_proj/v_proj has its k_scale/v_scale (engines
    otherwise quantize K and V with a default scale of 1.0); not set: no k/v scale at all (engines
    that find one scale K or V by it). Each scale one finite value > 0."""
    scales = sorted(k for k in ckpt.where if k.rsplit(".", 1)[-1] in KV_SUFFIXES)
    if kv_algo is None:
        bad = [f"{k} (no kv_cache_quant_algo declares it)" for k in scales]
        detail = "k/v cache scales the quantization config does not declare" if bad else "no KV-cache quantization"
        return Check("kv-cache-scales", not bad, detail, bad)
    bad = []
    for proj, suffix in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
        bad.extend(
            f"{k[: -len('weight')]}{suffix} (missing: kv_cache_quant_algo {kv_algo} needs it)"
            for k in ckpt.where
            if k.endswith(f".{proj}.weight") and f"{k[: -len('weight')]}{suffix}" not in ckpt.where
        )
        if not any(k.endswith("." + suffix) for k in scales):
            bad.append(f"*.{suffix} (none in the checkpoint: kv_cache_quant_algo {kv_algo} needs them)")
    bad.extend(p for k in scales if (p := _scalar_problem(ckpt, k)))
    detail = (
        f"kv_cache_quant_algo {kv_algo}: k/v scales missing or not one finite value > 0"
        if bad
        else f"kv_cache_quant_algo {kv_algo}: {len(scales)} k/v scale(s), each one finite value > 0"
    )
    return Check("kv-cache-scales", not bad, detail, sorted(set(bad)))


def _weight_scale_keys(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """weight key -> (its weight_scale key, the prefix its other scales share), for every weight that
    has a weight_scale: ``{m}.weight`` -> ``{m}.``; a fused ``{name}`` -> ``{name}_``."""
    out = {}
    for k in ckpt.where:
        if k.endswith(".weight_scale") and (w := k[: -len("_scale")]) in ckpt.where:
            out[w] = (k, k[: -len("weight_scale")])
        elif k.endswith("_weight_scale") and (w := k[: -len("_weight_scale")]) in ckpt.where:
            out[w] = (k, k[: -len("weight_scale")])
    return out


def _check_input_scales(ckpt: Checkpoint, algo: str | None) -> Check:
    """A format that quantizes activations (FP8, NVFP4 W4A4) needs an input_scale next to every
    quantized weight, dense linears too: the engine's linear reads it, and one left out loads as an
    uninitialized or zero scale (1/0 in the kernel)."""
    needs = "input_scale" in _required_scales(algo)
    weights = _weight_scale_keys(ckpt)
    bad = sorted(f"{p}input_scale (missing: {algo} quantizes {w}'s input)" for w, (_, p) in weights.items()
                 if needs and f"{p}input_scale" not in ckpt.where)  # fmt: skip
    detail = (
        f"quantized weights without the input_scale {algo} needs"
        if bad
        else f"{len(weights)} quantized weight(s), each with its input_scale"
        if needs
        else f"{algo or 'unquantized'}: no input scales needed"
    )
    return Check("input-scales", not bad, detail, bad)


def _check_scale_shapes(ckpt: Checkpoint, contract: NamingContract | None, meta: QuantMetadata) -> Check:
    """Every scale exactly the shape its format has, so that no engine broadcasts a wrong one over a
    weight: NVFP4 ``weight_scale`` one F8 value per group of 16 along the packed dimension of the
    unquantized shape ([out, in/16] for a linear), FP8 ``weight_scale`` one value or one per output
    row; ``weight_scale_2`` and ``input_scale`` of a linear one value."""
    if contract is None or meta.algo is None:
        return Check("scale-shapes", True, "nothing to check (no naming contract or unquantized)")
    group = meta.quant.get("group_size") or 16
    nvfp4 = _nvfp4(meta.algo)
    bad, n = [], 0
    for w, (ws, prefix) in _weight_scale_keys(ckpt).items():
        if w not in contract.names:
            continue  # hub-names reports it
        want, have, scale = list(contract.names[w]), ckpt.shape[w], ckpt.shape[ws]
        n += 1
        if nvfp4:
            packed = [d for d, (a, b) in enumerate(zip(have, want)) if 2 * a == b] if len(have) == len(want) else []
            if len(packed) != 1 and have != want:
                continue  # the weight itself does not fit: hub-names reports it
            d = packed[0] if packed else len(want) - 1
            expected = [*want[:d], want[d] // group, *want[d + 1 :]]
            if scale != expected:
                bad.append(f"{ws} shape {scale} (NVFP4: {expected}, one scale per {group} of {w} {want})")
        elif len(want) == 2 and scale not in ([], [1], [want[0]], [want[0], 1]):
            bad.append(f"{ws} shape {scale} (FP8: one value, or one per output row of {w} {want})")
        if w.endswith(".weight"):
            for x in ("weight_scale_2", "input_scale"):
                key = prefix + x
                if key in ckpt.where and ckpt.shape[key] not in ([], [1]):
                    bad.append(f"{key} shape {ckpt.shape[key]} (one value per linear)")
    detail = (
        "scales of a shape an engine would broadcast over the wrong weights"
        if bad
        else f"{n} quantized weight(s), every scale of its format's shape"
    )
    return Check("scale-shapes", not bad, detail, bad)
