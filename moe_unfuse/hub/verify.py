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
- one check per rule of ``engine`` (an :class:`~moe_unfuse.hub.engines.Engine` a plugin registers; the
  built-in ones in ``moe_unfuse.default_plugins.engines``): what that engine's loader reads, each rule
  citing the loader source and versions it was read from (``../shared/reference/engine_contracts.md``).

Unreadable input (a missing or corrupt file, invalid JSON) raises a one-line :class:`MoeUnfuseError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from ..base.errors import MoeUnfuseError
from ..spec.catalog import get_spec, select_specs, specs_for
from ..spec.catalog import specs as catalog_specs
from ..spec.model import Spec
from .checkpoint import (
    FLOAT_DTYPES,
    METADATA_FILE,
    SCALE_SUFFIXES,
    excluded,
    fused_scale_base,
    is_nvfp4,
    must_exclude,
    quantized_modules,
    required_scales,
)
from .checkpoint_input import (
    check_config_bounds,
    check_metadata_engine,
    parameter_budget,
    read_quant_metadata,
)
from .checkpoint_reader import Checkpoint
from .engines import PER_EXPERT_RE, EngineContext, EngineRule, engines, get_engine
from .metadata_checks import metadata_checks
from .naming import QUANT_SUFFIXES, NamingContract, build_contract, meta_model_from_config
from .policy import KEEP_UNQUANTIZED_RE
from .verify_report import Check, VerifyReport

GATE_UP_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
#: Scale dtypes per format (False: FP8, True: NVFP4), as modelopt writes and the engines read them.
_SCALE_DTYPES = {
    False: {"weight_scale": "F32", "input_scale": "F32"},
    True: {"weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"},
}


def engine_rules(engine: str) -> list[EngineRule]:
    """The rules of the registered engine ``engine`` (``register_engines``; the built-in ones:
    ``moe_unfuse.default_plugins.engines``); an unknown engine is one line listing the known ones."""
    return list(get_engine(engine).rules)


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
    engine = engine or check_metadata_engine(f"{path}/{METADATA_FILE}", metadata, tuple(engines())) or "vllm"
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
    ctx = EngineContext(ckpt, contract, engine, metadata, hf_quant, qc, algo, excludes)

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
        _check_excluded(ckpt, keys, excludes, quantized, ctx.quantized_for(engine)),
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
                for x in required_scales(algo)
                if x != "input_scale" and scale_key(x) not in ckpt.where
            )
            for x, want_dtype in _SCALE_DTYPES[is_nvfp4(algo)].items():
                if scale_key(x) in ckpt.where and ckpt.dtype[scale_key(x)] != want_dtype:
                    bad.append(f"{scale_key(x)} dtype {ckpt.dtype[scale_key(x)]} (expected {want_dtype})")
        if not scaled:
            pass
        elif is_nvfp4(algo):
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


def _check_complete(ckpt: Checkpoint, contract: NamingContract | None, excludes: list[str], algo: str | None) -> Check:
    required = required_scales(algo)
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
